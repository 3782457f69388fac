"""The colocated encoder -> LLM bridge: encoder rows move from the encoder's dp layout to the LLM's.

Both grids span the same ranks; only the batch (dp) dimension changes, activations are replicated over tp
on both sides. With `scale = max(dp) / min(dp)`, each dp block of the coarser grid is `scale` dp blocks
("slots", in the finer grid's dp order) of the finer one: consecutive, or strided under LLM pp, whose dp blocks
span every stage (checked by grid_spec.check_nesting):

  fan-in  (encoder dp > LLM dp): forward all-gathers the slots' rows (slot order) to every rank of the
          LLM dp block; backward narrows the gradient to this rank's slot.
  fan-out (LLM dp > encoder dp): forward narrows the block's rows to this rank's LLM slot; backward
          all-gathers the slots' gradients (each slot used a different slice, so this is a concatenation,
          not a sum or a zero-padding).
  equal:  identity.

Sibling groups are the ranks of one coarse block that share every non-dp coordinate of the finer grid
(its tp index, the LLM's cp index and pp stage), ordered by the finer dp index, i.e. slot order. Slots hold
different numbers of rows (images per sample vary; text-only samples give none), so fan-in exchanges the
row counts before gathering, and fan-out takes them from the caller (every sibling knows the block's
images per sample).

LLM cp > 1: the LLM shards the spliced sequence, so the gradient reaching the bridge holds only this
rank's sequence chunks. It is all-reduced (SUM) over the LLM cp group before the direction's backward, so
every cp sibling holds the full-sequence gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from automodel_mimo.distributed.grid_spec import GridSpec
from automodel_mimo.distributed.grids import Grid


class _FanIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, group, slot: int) -> torch.Tensor:
        n = dist.get_world_size(group)
        sizes = torch.zeros(n, dtype=torch.long, device=rows.device)
        sizes[slot] = rows.shape[0]
        dist.all_reduce(sizes, group=group)  # row counts of every slot first
        sizes = sizes.tolist()
        width = max(1, max(sizes))  # pad to a common size; never a zero-size collective
        padded = rows.new_zeros((width, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.start, ctx.count = sum(sizes[:slot]), sizes[slot]
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(0, ctx.start, ctx.count).contiguous(), None, None


class _FanOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], group, slot: int) -> torch.Tensor:
        ctx.sizes, ctx.group, ctx.slot = sizes, group, slot
        return rows.narrow(0, sum(sizes[:slot]), sizes[slot]).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        width = max(1, max(ctx.sizes))
        padded = grad.new_zeros((width, *grad.shape[1:]))
        padded[: grad.shape[0]] = grad
        parts = [torch.empty_like(padded) for _ in ctx.sizes]
        dist.all_gather(parts, padded.contiguous(), group=ctx.group)
        return torch.cat([p[:s] for p, s in zip(parts, ctx.sizes)]), None, None, None


class _SumGradOverCp(torch.autograd.Function):
    """Identity forward; backward all-reduces (SUM) the gradient over the LLM cp group."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over_cp(rows: torch.Tensor, group) -> torch.Tensor:
    """Identity whose backward sums the gradient over the LLM's cp group (each cp rank's covers its chunks)."""
    return _SumGradOverCp.apply(rows, group)


def sibling_groups(encoder: GridSpec, language: GridSpec) -> list[list[int]]:
    """Every sibling group (slot order), in one fixed order: coarse dp block, then finer non-dp coordinate."""
    e, lm = encoder.dim_size("dp"), language.dim_size("dp")
    if e == lm:
        return []
    fine, coarse = (encoder, language) if e > lm else (language, encoder)
    groups = []
    for block in coarse.dp_blocks():
        by_coord: dict[tuple, list[tuple[int, int]]] = {}
        for r in sorted(block):
            c = fine.coords(r)
            key = tuple(v for d, v in c.items() if d != "dp")
            by_coord.setdefault(key, []).append((c["dp"], r))
        groups.extend([r for _, r in sorted(members)] for _, members in sorted(by_coord.items()))
    return groups


class Bridge:
    """Encoder rows (batch-major, this rank's encoder slot) -> the rows of this rank's LLM slot.

    Collective constructor: every rank builds every bridge in the same order. `destroy()` releases the groups.
    """

    def __init__(self, encoder: Grid, language: Grid):
        e, lm = encoder.size("dp"), language.size("dp")
        self.direction = "equal" if e == lm else ("fan_in" if e > lm else "fan_out")
        self.scale = max(e, lm) // min(e, lm)
        self.slot, self.group = 0, None  # this rank's slot in its coarse dp block: its place in its sibling group
        rank = dist.get_rank()
        for ranks in sibling_groups(encoder.spec, language.spec):  # every rank creates every group
            group = dist.new_group(ranks)
            if rank in ranks:
                self.group, self.slot = group, ranks.index(rank)
        self.cp_group = language.group("cp") if language.size("cp") > 1 else None

    def __call__(self, rows: torch.Tensor, slot_rows: list[int]) -> torch.Tensor:
        """`rows`: this rank's encoder output (encoder slot); `slot_rows`: rows per finer slot of the coarse
        block in slot order (fan-out needs them; fan-in checks its exchanged counts against them)."""
        if self.direction == "fan_in":
            out = _FanIn.apply(rows, self.group, self.slot)
            assert out.shape[0] == sum(slot_rows), f"bridge: gathered {out.shape[0]} rows, expected {slot_rows}"
        elif self.direction == "fan_out":
            assert rows.shape[0] == sum(slot_rows), f"bridge: {rows.shape[0]} encoder rows, expected {slot_rows}"
            out = _FanOut.apply(rows, list(slot_rows), self.group, self.slot)
        else:
            out = rows
        if self.cp_group is not None:
            out = _SumGradOverCp.apply(out, self.cp_group)
        return out

    def destroy(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
