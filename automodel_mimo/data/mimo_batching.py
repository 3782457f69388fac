"""MIMO microbatches: padded text tensors plus the images of every row, batch-major.

Batch contract (what the MIMO model consumes):
  input_ids, labels, attention_mask, loss_mask, position_ids  (B, T), as data/batching.collate for text,
                                                              placeholders contiguous, tokens_per_image per image
  pixel_values   float32 (N_img, C, H, W): the images of row 0 first, then row 1, ...; N_img may be 0
  image_counts   long (B,): images per row (0 for text-only rows)
"""

from __future__ import annotations

from typing import Any

import torch

from automodel_mimo.data.batching import collate
from automodel_mimo.data.images import ImageProcessor


def mimo_rows(rows: dict[str, list], processor: ImageProcessor) -> list[dict[str, Any]]:
    """Columns of a tokenized MIMO slice (`dataset[indices]`) -> collate_mimo rows with preprocessed pixels."""
    return [
        {"input_ids": ids, "labels": labels, "pixel_values": processor(images)}
        for ids, labels, images in zip(rows["input_ids"], rows["labels"], rows["images"])
    ]


def collate_mimo(rows: list[dict], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """rows: input_ids, labels, and pixel_values (n_i, C, H, W), n_i >= 0, all rows sharing C, H, W."""
    shapes = {tuple(r["pixel_values"].shape[1:]) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"rows carry images of different shapes {sorted(shapes)}; preprocess them to one size")
    batch = collate(rows, pad_id, device)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1], device=batch["input_ids"].device).expand_as(
        batch["input_ids"]).contiguous()
    batch["pixel_values"] = torch.cat([r["pixel_values"].float() for r in rows]).to(device)
    batch["image_counts"] = torch.tensor([len(r["pixel_values"]) for r in rows], dtype=torch.long, device=device)
    return batch


def split_mimo_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a collate_mimo batch, with exactly those rows' images."""
    offsets = [0, *torch.cumsum(batch["image_counts"], 0).tolist()]
    return {k: v[offsets[start]:offsets[stop]] if k == "pixel_values" else v[start:stop] for k, v in batch.items()}
