"""Packed-sequence attention for HF models, registered as attn_implementation="packed_sdpa".

A packed row holds several sequences; attention must be causal inside each and blind across them. The
boundaries come from `position_ids` alone (a sequence starts where its position is 0), which HF passes
to every attention call and pipeline stages receive as a batch-major tensor — so the same function serves
plain, packed and pipelined models. CPU: SDPA with an explicit block-diagonal causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "packed_sdpa"


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


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("packed_sdpa attention needs position_ids (restarting at 0 for every packed sequence)")
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, _repeat_kv(key, groups), _repeat_kv(value, groups), attn_mask=block_causal_mask(position_ids),
        dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the attention builds its own mask from position_ids


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, _no_mask)
