"""What a loss sees of a microbatch: per-token logprobs of whole rows, or one sequence per row when packed.

A handle computes logits on its share of a microbatch (a context-parallel shard of every row); the losses
above it want whole rows: `whole_rows` turns (logits, shard) into (logprobs, view) where both cover whole
rows in their original order (cp shards gathered; the gather's backward hands each rank its own slice), and a
packed microbatch (one with `seq_index`) is seen as one sequence per row (data/packing.py `per_sequence`), so
sequence-level losses (DPO pairs 2i / 2i+1, per-sequence advantages) work unchanged. Side data (old / reference
logprobs, advantages) arrives in whole-row or slot layout already and is never sharded.
"""

from __future__ import annotations

import torch

from automodel_mimo.data.packing import per_sequence, to_sequences
from automodel_mimo.losses import token_logprobs
from automodel_mimo.parallel.context_parallel import gather_to_original_order


def scaled_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token logprobs of `labels` under logits / temperature (the distribution rollouts were sampled from)."""
    return token_logprobs(logits if temperature == 1.0 else logits / temperature, labels)


def row_logprobs(logits: torch.Tensor, shard: dict, temperature: float, cp_group) -> torch.Tensor:
    """[B, S] logprobs of whole rows in original order, on every cp rank (`cp_group` None: no sharding)."""
    lp = scaled_logprobs(logits, shard["labels"], temperature)
    return lp if cp_group is None else gather_to_original_order(lp, shard["cu_seqlens_padded"], cp_group)


def whole_row_mask(shard: dict, cp_group) -> torch.Tensor:
    """The shard's `loss_mask` as whole rows in original order (no gradient)."""
    if cp_group is None:
        return shard["loss_mask"]
    with torch.no_grad():
        return gather_to_original_order(shard["loss_mask"].float(), shard["cu_seqlens_padded"], cp_group)


def whole_rows(logits: torch.Tensor, shard: dict, temperature: float, cp_group) -> tuple[torch.Tensor, dict]:
    """(logprobs, view) of whole rows, or of one sequence per row for a packed microbatch: what losses see."""
    lp = row_logprobs(logits, shard, temperature, cp_group)
    view = {**shard, "loss_mask": whole_row_mask(shard, cp_group)}
    if "seq_index" in view:
        return to_sequences(lp, view["seq_index"]), per_sequence(view)
    return lp, view


def in_slots(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """Whole-row per-token values as a packed microbatch's sequence slots [R, K, L]; unchanged if unpacked."""
    if "seq_index" not in mb:
        return values
    return to_sequences(values, mb["seq_index"]).view(mb["seq_index"].shape)


def slot_shape(mb: dict) -> tuple:
    """The per-row shape `in_slots` gives: (S,) whole rows, or (K, L) sequence slots."""
    return tuple(mb["seq_index"].shape[1:]) if "seq_index" in mb else (mb["input_ids"].shape[1],)
