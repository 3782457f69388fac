"""Collectives with an autograd backward that work on gloo and NCCL alike.

torch.distributed.nn.functional.all_gather emulates reduce-scatter on gloo with a scatter that addresses
global ranks, which fails inside sub-groups (seen with torch 2.13: "Global rank 1 is not part of group").
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _gather(tensor, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank used every part: the gradient of my part is the sum over ranks of their grad slices.
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            chunks = [c.contiguous() for c in grad.chunk(world, ctx.dim)]
            out = torch.empty_like(chunks[rank])
            dist.reduce_scatter(out, chunks, group=ctx.group)
            return out, None, None
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return _mine(grad, ctx.dim, ctx.group), None, None


def all_gather_with_grad(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenation of every rank's `tensor` along `dim`; backward sums each rank's share back to it."""
    return _AllGather.apply(tensor, dim, group)


class _KeepMyRows(torch.autograd.Function):
    """Forward: this rank's 1/world of the rows of a tensor every rank of `group` holds identically. Backward: the
    rows' gradients of every rank, concatenated (each rank's part of the replicated input got its gradient there)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _mine(tensor, 0, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, 0, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, concatenated (the result is identical on every rank of `group`). Backward: this
    rank's rows of the gradient, which every rank computed identically from the replicated result."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _gather(tensor, 0, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _mine(grad, 0, ctx.group), None


def _gather(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `tensor` of `group`, concatenated along `dim` in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim)


def _mine(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's equal part of `tensor` along `dim`."""
    return tensor.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)].contiguous()


def keep_my_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """This rank's equal share of the rows of a tensor replicated over `group` (rows divisible by its size)."""
    return _KeepMyRows.apply(tensor, group)


def gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows of `group` in rank order, replicated; the inverse of `keep_my_rows`."""
    return _GatherRows.apply(tensor, group)
