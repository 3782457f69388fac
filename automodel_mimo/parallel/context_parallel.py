"""Context parallelism: load-balanced sharding of (packed) rows over the cp group, and the switch that
makes the packed attention gather keys/values over cp.

Sharding: every sequence segment of a row (from `cu_seqlens_padded`; an unpacked row is one segment) is
cut into 2*cp equal chunks and cp rank r keeps chunks r and 2cp-1-r ("dual chunk swap"): early chunks are
cheap under causal attention and late ones expensive, so every rank gets the same work, and every rank
holds a share of every sequence. Tokens keep their global `position_ids` (RoPE and masking use them);
labels were shifted before packing, so no shard needs its neighbour's token.

The attention side (models/packed_attention.py) reads the group set by `cp_attention(group)`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX
from automodel_mimo.models import packed_attention

SHARDED_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "moe_segments")


def cp_indices(cu_seqlens_padded: list[int], cp: int, rank: int) -> list[int]:
    """Row positions kept by cp `rank`: chunks rank and 2cp-1-rank of every segment, in row order."""
    keep = []
    for start, end in zip(cu_seqlens_padded[:-1], cu_seqlens_padded[1:]):
        if end == start:
            continue
        if (end - start) % (2 * cp):
            raise UserInputError(
                f"a packed segment of {end - start} tokens is not a multiple of 2*parallel.cp={2 * cp}; "
                "sequences must be padded to a multiple of 2*cp before sharding")
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            keep.extend(range(start + c * chunk, start + (c + 1) * chunk))
    return keep


def shard_batch(batch: dict, cp: int, rank: int) -> dict:
    """This cp rank's share of every row (rows keep their order; each gets length / cp tokens)."""
    if cp == 1:
        return batch
    index = torch.stack([torch.as_tensor(cp_indices(row.tolist(), cp, rank)) for row in batch["cu_seqlens_padded"]])
    index = index.to(batch["input_ids"].device)
    out = dict(batch)
    for key in SHARDED_KEYS:
        if key in batch:
            out[key] = batch[key].gather(1, index)
    if "inputs_embeds" in batch:  # [B, T, H] (MIMO: spliced embeddings of the full sequence)
        embeds = batch["inputs_embeds"]
        out["inputs_embeds"] = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    return out


def as_single_segments(batch: dict, cp: int, pad_id: int) -> dict:
    """A padded (unpacked) batch as packed rows of one segment each, length padded to a multiple of 2*cp."""
    T = batch["input_ids"].shape[1]
    T2 = -(-T // (2 * cp)) * (2 * cp)
    out = {}
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    for key, value in batch.items():
        out[key] = torch.nn.functional.pad(value, (0, T2 - T), value=fill.get(key, 0))
    B = out["input_ids"].shape[0]
    out["position_ids"] = torch.arange(T2, device=out["input_ids"].device).expand(B, T2).contiguous()
    real = batch["attention_mask"].sum(1).to(torch.int32) if "attention_mask" in batch else torch.full((B,), T, dtype=torch.int32)
    out["cu_seqlens"] = torch.stack([torch.zeros_like(real), real], 1)
    out["cu_seqlens_padded"] = torch.tensor([[0, T2]] * B, dtype=torch.int32, device=real.device)
    out.pop("attention_mask", None)  # the packed attention reads segments from position_ids
    return out


@contextmanager
def cp_attention(group: dist.ProcessGroup | None):
    """Within the block, packed attention gathers K/V over `group` (None or size 1: local attention)."""
    previous = packed_attention.CP_GROUP
    packed_attention.CP_GROUP = group if group is not None and dist.get_world_size(group) > 1 else None
    try:
        yield
    finally:
        packed_attention.CP_GROUP = previous


# ---------------------------------------------------------------- values back in original order


def _row_order(cu_seqlens_padded: torch.Tensor, cp: int) -> torch.Tensor:
    """[B, S] permutation: the concatenation of cp ranks' shards (rank-major) -> original row positions."""
    return torch.stack([torch.as_tensor([i for r in range(cp) for i in cp_indices(row.tolist(), cp, r)])
                        for row in cu_seqlens_padded])


class _GatherToOriginalOrder(torch.autograd.Function):
    """Every cp rank gets the whole row in original order. Backward: each rank computed the same loss from
    the gathered tensor, so its local part's gradient is just its slice — summing over ranks would count
    it cp times."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, order: torch.Tensor, group) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        sharded = torch.cat(parts, 1)
        ctx.save_for_backward(order)
        ctx.rank, ctx.width = dist.get_rank(group), local.shape[1]
        return torch.empty_like(sharded).scatter_(1, order.to(local.device), sharded)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        sharded = grad.gather(1, order.to(grad.device))
        return sharded[:, ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width].contiguous(), None, None


def gather_to_original_order(local: torch.Tensor, cu_seqlens_padded: torch.Tensor, group) -> torch.Tensor:
    """[B, S/cp] per-token values of this cp rank -> [B, S] in the unsharded row order, on every cp rank."""
    cp = dist.get_world_size(group)
    if cp == 1:
        return local
    return _GatherToOriginalOrder.apply(local, _row_order(cu_seqlens_padded, cp), group)


class _SumOverCp(torch.autograd.Function):
    """All-reduce SUM of per-sequence partial sums; every rank then computes the same loss from the total,
    so the backward passes the gradient through unchanged (no second sum)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_cp(partial: torch.Tensor, group) -> torch.Tensor:
    """Sequence-level quantities (e.g. summed logprobs for DPO) from each cp rank's share of the tokens."""
    if group is None or dist.get_world_size(group) == 1:
        return partial
    return _SumOverCp.apply(partial, group)
