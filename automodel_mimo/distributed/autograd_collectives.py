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
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim)

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
        return grad.chunk(world, ctx.dim)[rank].contiguous(), None, None


def all_gather_with_grad(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenation of every rank's `tensor` along `dim`; backward sums each rank's share back to it."""
    return _AllGather.apply(tensor, dim, group)
