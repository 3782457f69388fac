"""Global batches whose content depends on the seed and the step only, split over DP ranks and microbatches.

Every layout (dp, tp, micro_batch_size, nproc) sees the same global batch at a given step, which is what
lets a parallel run be compared with a single-process one, and lets a resumed run continue exactly.
"""

from __future__ import annotations

import torch

from automodel_mimo.losses import IGNORE_INDEX


def global_batch_indices(step: int, num_rows: int, global_batch_size: int, seed: int) -> list[int]:
    """Row indices of the global batch of `step` (0-based): a window over back-to-back epoch permutations."""
    start = step * global_batch_size
    indices: list[int] = []
    while len(indices) < global_batch_size:
        epoch, offset = divmod(start + len(indices), num_rows)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(num_rows - offset, global_batch_size - len(indices))
        indices.extend(perm[offset:offset + take].tolist())
    return indices


def local_slice(items: list, rank: int, world: int) -> list:
    """Contiguous block `rank` of `world` equal blocks (the caller guarantees divisibility)."""
    size = len(items) // world
    return items[rank * size:(rank + 1) * size]


def split_microbatches(rows: list, micro_batch_size: int) -> list[list]:
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


def split_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of every tensor of a collated batch."""
    return {k: v[start:stop] for k, v in batch.items()}


def collate(rows: list[dict], pad_id: int, device: torch.device | str = "cpu") -> dict:
    """Right-pad `input_ids`/`labels` rows to the longest row; `loss_mask` marks tokens that carry loss."""
    length = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).float()
    return batch


def pad_rows(batch: dict, n_rows: int, pad_id: int) -> dict:
    """Append weight-0 rows (pad tokens, no loss tokens) up to `n_rows`. A packed / cp-sharded batch's dummy
    rows are one padding segment of the full row (`cu_seqlens_padded` [0, S, S, ...]) and have empty sequence
    slots, so the cp gather and the per-sequence view treat them like any row; they hold no images (`pixel_values`
    is per image, not per row)."""
    have = batch["input_ids"].shape[0]
    if have == n_rows:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 1, "position_ids": 0, "seq_index": -1,
            "moe_segments": -1}
    if "cu_seqlens_padded" in batch:
        fill["cu_seqlens_padded"] = int(batch["cu_seqlens_padded"][:, -1].max())
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            out[key] = value
            continue
        extra = value.new_full((n_rows - have, *value.shape[1:]), fill.get(key, 0))
        if key == "cu_seqlens_padded":
            extra[:, 0] = 0
        out[key] = torch.cat([value, extra])
    return out
