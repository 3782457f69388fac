"""One microbatch builder for every algorithm and model: rows -> whole-row microbatches a handle can run.

A row is a dict with `input_ids` and `labels` (shifted), optionally `pixel_values` [n_images, C, H, W] (a MIMO
row's images, in placeholder order) and side data: per-token lists aligned with the labels (e.g. GRPO's
`gen_logprobs`) or one number per row (e.g. `advantages`).

- Padded: `micro_rows` rows per microbatch, right-padded to the longest (data/batching.collate). Under context
  parallelism every row becomes one segment padded to a multiple of the handle's `pad_multiple` (2 * cp), which
  is what the handle's sharding needs (parallel/context_parallel.py).
- Packed (`packed_size`, data.packing): sequences bin-packed into rows of that many tokens (each padded to
  `pad_multiple`; `group` consecutive rows kept in one packed row, e.g. a DPO pair), `micro_rows` packed rows
  per microbatch, with `seq_index` and side data in slot layout [R, K, ...] (data/packing.py).
- Packed microbatches are padded with weight-0 rows to a multiple of `rows_multiple` (a MIMO fan-out splits a
  microbatch's rows evenly over the LLM's dp slots; padded microbatches get that from train.micro_batch_size).
- Images ride along: `pixel_values` of the microbatch's rows in placeholder order (row-major, then sequence
  order within a packed row) and `image_counts` per (packed) row.

Sharding over cp happens in the handle, which alone knows its cp rank; the rows of this rank (its data block)
are the caller's: `handle.data_block()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from automodel_mimo.config import RunConfig, packed_row_size, round_up
from automodel_mimo.data.batching import collate, pad_rows, split_microbatches
from automodel_mimo.data.packing import pack_microbatches
from automodel_mimo.errors import UserInputError
from automodel_mimo.parallel.context_parallel import as_single_segments

TEXT_KEYS = ("input_ids", "labels")


@dataclass
class MicrobatchBuilder:
    pad_id: int
    device: torch.device
    cp: int = 1  # the handle's context-parallel size: padded rows become one cp-shardable segment each
    pad_multiple: int = 1  # packed sequences are padded to this (2 * cp, times tp under sequence parallelism)
    packed_size: int | None = None  # tokens per packed row; None: padded rows
    rows_multiple: int = 1  # packed microbatches get weight-0 rows up to a multiple (a MIMO fan-out splits rows)

    @classmethod
    def for_run(cls, cfg: RunConfig, handle, pad_id: int) -> "MicrobatchBuilder":
        return cls(pad_id, handle.device, handle.cp_size, handle.pad_multiple,
                   packed_row_size(cfg.data) if cfg.data.packing else None, handle.rows_multiple())

    def build(self, rows: list[dict], micro_rows: int, group: int = 1) -> list[dict]:
        """Microbatches of `micro_rows` rows (padded) or packed rows (packed; `group` rows stay together)."""
        if self.packed_size is not None:
            return self._packed(rows, micro_rows, group)
        return [self._padded(chunk) for chunk in split_microbatches(rows, micro_rows)]

    def check_fits(self, rows: list[dict], what: str) -> None:
        """Packed rows only: every row, padded to `pad_multiple`, fits a packed row (pass every rank's rows,
        so that every rank raises alike); padded rows always fit."""
        if self.packed_size is None or not rows:
            return
        longest = max(round_up(len(r["input_ids"]), self.pad_multiple) for r in rows)
        if longest > self.packed_size:
            raise UserInputError(f"{what} padded to {longest} tokens does not fit a packed row of "
                                 f"data.packed_sequence_size={self.packed_size}; raise data.packed_sequence_size")

    def _padded(self, rows: list[dict]) -> dict:
        batch = collate([{k: r[k] for k in TEXT_KEYS} for r in rows], self.pad_id, self.device)
        if self.cp > 1:  # before the side data, which is then made as wide
            batch = as_single_segments(batch, self.cp, self.pad_id)
        width = batch["input_ids"].shape[1]
        for key in side_keys(rows):
            batch[key] = _side_tensor([r[key] for r in rows], width).to(self.device)
        return _with_images(batch, rows, [[i] for i in range(len(rows))], self.device)

    def _packed(self, rows: list[dict], micro_rows: int, group: int) -> list[dict]:
        out = []
        for mb, slots in pack_microbatches([{k: r[k] for k in TEXT_KEYS} for r in rows], self.packed_size,
                                           self.pad_multiple, micro_rows, self.pad_id, self.device, group=group):
            R, K, L = mb["seq_index"].shape
            for key in side_keys(rows):
                values = [[rows[i][key] for i in seqs] for seqs in slots]
                mb[key] = _slot_tensor(values, K, L).to(self.device)
            mb = _with_images(mb, rows, slots, self.device)
            out.append(pad_rows(mb, round_up(R, self.rows_multiple), self.pad_id))
        return out


def side_keys(rows: list[dict]) -> list[str]:
    return [k for k in rows[0] if k not in (*TEXT_KEYS, "pixel_values")] if rows else []


def _side_tensor(values: list, width: int) -> torch.Tensor:
    """Per-row side data: numbers -> [B]; per-token lists -> [B, width], zero-padded."""
    if not isinstance(values[0], (list, tuple, torch.Tensor)):
        return torch.tensor(values, dtype=torch.float32)
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, :len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out


def _slot_tensor(values: list[list], K: int, L: int) -> torch.Tensor:
    """Side data of packed rows in slot layout: numbers -> [R, K]; per-token lists -> [R, K, L]; 0 in empty slots."""
    per_token = any(isinstance(v, (list, tuple, torch.Tensor)) for seqs in values for v in seqs)
    out = torch.zeros(len(values), K, *((L,) if per_token else ()), dtype=torch.float32)
    for r, seqs in enumerate(values):
        for k, v in enumerate(seqs):
            if per_token:
                out[r, k, :len(v)] = torch.as_tensor(v, dtype=torch.float32)
            else:
                out[r, k] = float(v)
    return out


def _with_images(batch: dict, rows: list[dict], per_row: list[list[int]], device) -> dict:
    """`pixel_values` (the rows' images in placeholder order) and `image_counts` per batch row, for rows with
    images; `per_row[r]` lists the input rows packed into batch row r, in order."""
    if not rows or "pixel_values" not in rows[0]:
        return batch
    n_rows = batch["input_ids"].shape[0]
    images = [rows[i]["pixel_values"] for seqs in per_row for i in seqs]
    counts = [sum(len(rows[i]["pixel_values"]) for i in seqs) for seqs in per_row] + [0] * (n_rows - len(per_row))
    batch["pixel_values"] = torch.cat([im.float() for im in images]).to(device)
    batch["image_counts"] = torch.tensor(counts, dtype=torch.long, device=device)
    return batch
