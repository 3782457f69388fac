"""Packed-sequence attention for HF models, registered as attn_implementation="packed_sdpa".

A packed row holds several sequences; attention must be causal inside each and blind across them. The
boundaries come from `position_ids` alone (a sequence starts where its position is 0), which HF passes
to every attention call and pipeline stages receive as a batch-major tensor — so the same function serves
plain, packed and pipelined models, and context parallelism (K/V all-gathered over cp, masked by global
position and segment).

Kernels: on CUDA in bf16/fp16, torch's varlen flash attention (models/varlen_attention.py), packed or CP,
with no mask at all; elsewhere (CPU, fp32) SDPA with an explicit boolean mask, O(T^2) memory per row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from automodel_mimo.distributed.autograd_collectives import all_gather_with_grad
from automodel_mimo.models import varlen_attention

NAME = "packed_sdpa"
CP_GROUP = None  # set by parallel.context_parallel.cp_attention while sharded batches run


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] sequence index of every token: a new sequence starts at position 0."""
    return (position_ids == 0).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean: query t sees key s when both are in the same sequence and s <= t."""
    seg = segment_ids(position_ids)
    T = seg.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def cp_gather(key, value, position_ids, group):
    """Keys/values of the whole row from every cp rank (autograd: the backward sums each rank's share of
    dK/dV back to its owner), every rank's positions, and the sequence index of each local token.

    Segment ids come from cp rank 0's positions: only its chunks start segments at position 0, and every
    rank's local row has the same per-segment layout (chunks r and 2cp-1-r of equal size).
    """
    positions = [torch.empty_like(position_ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(positions, position_ids.contiguous(), group=group)
    keys = all_gather_with_grad(key, 2, group)
    values = all_gather_with_grad(value, 2, group)
    return keys, values, positions, segment_ids(positions[0])


def cp_mask(position_ids, positions, segments) -> torch.Tensor:
    """[B, 1, Tl, cp*Tl]: a local query sees gathered keys of its sequence at positions up to its own."""
    k_pos, k_seg = torch.cat(positions, -1), segments.repeat(1, len(positions))
    return ((segments[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= position_ids[:, :, None]))[:, None]


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("packed_sdpa attention needs position_ids (restarting at 0 for every packed sequence)")
    fast = varlen_attention.available(query, position_ids) and not (dropout and module.training)
    if CP_GROUP is None:
        if fast:
            cu = kwargs.get("cu_seq_lens_q")
            return varlen_attention.packed_attention(query, key, value, position_ids, scaling, cu=cu), None
        mask = block_causal_mask(position_ids)
    else:
        key, value, positions, segments = cp_gather(key, value, position_ids, CP_GROUP)
        if fast:
            return varlen_attention.cp_attention(query, key, value, position_ids, positions, segments, scaling), None
        mask = cp_mask(position_ids, positions, segments)
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, _repeat_kv(key, groups), _repeat_kv(value, groups), attn_mask=mask,
        dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def varlen_kwargs(model, inputs: dict, cp_size: int = 1) -> dict:
    """The packed rows' varlen plan as HF attention kwargs (`cu_seq_lens_q/k`, passed by every decoder layer to
    its attention), computed once per forward outside the compiled layers: inside, its data-dependent ops
    (nonzero) and the plan cache would break each compiled layer into several graphs (host-bound steps,
    docs/benchmarks.md). Empty unless the model runs this attention on CUDA without cp (cp plans its own)."""
    position_ids = inputs.get("position_ids")
    if (position_ids is None or not position_ids.is_cuda or cp_size > 1
            or getattr(model.config, "_attn_implementation", None) != NAME):
        return {}
    cu = varlen_attention.cu_seqlens(position_ids)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}


def _no_mask(*args, **kwargs):
    return None  # the attention builds its own mask from position_ids


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, _no_mask)
