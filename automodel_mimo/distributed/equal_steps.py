"""Equal step counts over data-parallel ranks: a rank with less data runs weight-0 dummy steps.

FSDP all-gathers (and pipeline schedules) are collectives over the data ranks: if one rank ran fewer
forward/backward steps than another, the other would wait forever. Dummy steps carry no loss tokens, so
they change nothing but time (docs/numerics.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from automodel_mimo.losses import IGNORE_INDEX


def max_over_group(value: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    if group is None:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t)


def weightless(batch: dict) -> dict:
    """A copy of `batch` that carries no loss: labels ignored, loss mask zero."""
    out = dict(batch)
    if "labels" in out:
        out["labels"] = torch.full_like(out["labels"], IGNORE_INDEX)
    if "loss_mask" in out:
        out["loss_mask"] = torch.zeros_like(out["loss_mask"])
    if "moe_segments" in out:  # no sequence either: a dummy step adds nothing to the MoE balance loss
        out["moe_segments"] = torch.full_like(out["moe_segments"], -1)
    return out


def equal_step_count(items: list, dummy, group: dist.ProcessGroup | None, device: torch.device) -> list:
    """`items` followed by copies of `dummy` up to the largest count on any rank of `group`."""
    return items + [dummy] * (max_over_group(len(items), group, device) - len(items))
