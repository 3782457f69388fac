"""The non-finite guard: one world-wide decision to skip a step, and a check that weights are finite
before anything is written from them.

A rank that saw inf/NaN in the loss or the global gradient norm must not step while another does (their
weights would drift apart and the next collective could hang on mismatched work), so the decision is one
MAX all-reduce over the world: skip when any rank saw a non-finite value. The weight check is the same
vote over every rank's local shards; checkpoints and exports call it so that no file ever holds NaN.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from automodel_mimo.errors import RunStopped


def reduce_device() -> torch.device:
    """Where a world all-reduce's tensor must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one all-reduce over the world)."""
    vote = torch.tensor([float(flag)], device=reduce_device())
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def nonfinite_vote(grad_norm: torch.Tensor, loss: float | torch.Tensor | None = None) -> torch.Tensor:
    """skip_step's decision left on the device (no host sync under NCCL): a 0-d float tensor, 1.0 on every rank
    when the global grad norm or the loss is inf/NaN on any rank (fused optimizers' `found_inf`)."""
    vote = (~torch.isfinite(grad_norm.detach().float())).float().reshape(()).to(reduce_device())
    if isinstance(loss, torch.Tensor):
        vote = torch.maximum(vote, (~torch.isfinite(loss.detach())).float().reshape(()).to(vote.device))
    elif loss is not None and not math.isfinite(float(loss)):
        vote.fill_(1.0)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return vote


def skip_step(grad_norm: torch.Tensor | float, loss: torch.Tensor | float | None = None) -> bool:
    """World consensus: skip this optimizer step when the global grad norm or the loss is inf/NaN on any rank.
    A non-finite loss with finite gradients counts too (the gradients of a NaN loss are not to be trusted)."""
    bad = not math.isfinite(float(grad_norm)) or (loss is not None and not math.isfinite(float(loss)))
    return any_rank(bad)


def local_shards_finite(params) -> bool:
    """True when every element of this rank's share of `params` (DTensor local shards) is finite."""
    for p in params:
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            return False
    return True


def weights_finite(params) -> bool:
    """Collective: True on every rank when every rank's shards of its `params` are finite."""
    return not any_rank(not local_shards_finite(params))


def require_finite_weights(params, what: str, holder: str = "the model weights") -> None:
    """Collective: raise RunStopped on every rank when any value is inf/NaN, before `what` is written."""
    if not weights_finite(params):
        raise RunStopped(f"{holder} hold inf/NaN, so {what} is not written (earlier checkpoints are "
                         "untouched); lower train.lr or check the data")
