"""One global gradient norm over parameters that live on different meshes, and clipping by it.

`torch.nn.utils.clip_grad_norm_` stacks per-parameter norms, which fails when DTensor parameters sit on
different meshes (FSDP-only norms next to FSDP x TP matrices; later the encoder's and the LLM's meshes).
So: one norm per mesh (a DTensor reduction over that mesh), made full, squared and summed here. An
`extra_group` (e.g. pipeline stages, each holding different parameters) sums the squares once more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def _grads_by_mesh(params: Iterable[torch.nn.Parameter]) -> dict[object, list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    return groups


def reduce_partial_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Reduce any gradient still pending a sum (a DTensor with a Partial placement) to Replicate. A replicated
    weight fed a tp-sharded input (models/tp_plan.py: Qwen3's q/k norms under `SequenceParallel`) gets a gradient
    summed over tp in backward on torch 2.13, but a Partial one on torch 2.11 (measured: the tp2 x ep2 MoE oracle's
    gradients exact, its AdamW post-step q/k norms 2e-3 off). The optimizer must see the sum on either version."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])


def global_grad_norm(params: Iterable[torch.nn.Parameter], device: torch.device,
                     extra_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm of all gradients, identical on every rank (fp32 scalar on `device`)."""
    squares = []
    for grads in _grads_by_mesh(params).values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)  # foreach on CUDA; per tensor on CPU
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().to(device) ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if extra_group is not None:
        dist.all_reduce(total, group=extra_group)
    return total.sqrt()


def clip_grads(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / total_norm) (the same rule as torch's clip_grad_norm_).
    The factor stays on the device (no host sync, so the GPU never waits for the host here); it is computed
    in float64 and applied as fp32, as a Python-float factor would be, and a factor of 1 changes nothing."""
    coef = (max_norm / (total_norm.double() + 1e-6)).clamp(max=1.0).float()
    for grads in _grads_by_mesh(params).values():  # one multi-tensor kernel per mesh on CUDA
        torch._foreach_mul_(grads, coef.to(grads[0].device))
