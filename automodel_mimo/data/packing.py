"""THD sequence packing: variable-length sequences bin-packed into rows of `packed_sequence_size` tokens.

- First-fit-decreasing over the padded lengths. Each sequence is padded to a multiple of `multiple`
  (2 * cp, so every context-parallel rank gets whole load-balanced chunks; also x tp under sequence
  parallel); the rest of a row is one padding segment.
- Labels arrive already shifted (next-token) from tokenization, so packing never needs a neighbour's
  token; padding carries label -100.
- `position_ids` restart at 0 for every sequence (and for the padding segment): they are what RoPE and
  the packed attention (`models/packed_attention.py`) read. `cu_seqlens` (true lengths: counting, slicing
  data) and `cu_seqlens_padded` (attention boundaries, CP chunking) are kept per row, padded on the right
  with their last value so a batch of rows stays one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class PackedRow:
    sequences: list[int] = field(default_factory=list)  # indices into the input rows
    used: int = 0  # padded tokens placed so far


def pack(lengths: list[int], packed_sequence_size: int, multiple: int = 1) -> list[PackedRow]:
    """First-fit-decreasing assignment of sequences (by padded length) to rows."""
    if packed_sequence_size % multiple:
        raise UserInputError(
            f"data.packed_sequence_size={packed_sequence_size} must be a multiple of {multiple} "
            "(2 * parallel.cp, times parallel.tp with sequence parallelism)")
    padded = [round_up(n, multiple) for n in lengths]
    rows: list[PackedRow] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-padded[i], i)):
        if padded[i] > packed_sequence_size:
            raise UserInputError(
                f"a sequence of {lengths[i]} tokens (padded to {padded[i]}) does not fit in a packed row of "
                f"data.packed_sequence_size={packed_sequence_size}; raise data.packed_sequence_size or lower data.max_seq_len")
        row = next((r for r in rows if r.used + padded[i] <= packed_sequence_size), None)
        if row is None:
            row = PackedRow()
            rows.append(row)
        row.sequences.append(i)
        row.used += padded[i]
    return rows


def collate_packed(rows: list[dict], plan: list[PackedRow], packed_sequence_size: int, multiple: int, pad_id: int,
                   n_rows: int | None = None, device: torch.device | str = "cpu") -> dict:
    """Tensors for packed rows: input_ids, labels, loss_mask, position_ids, cu_seqlens(_padded).

    `n_rows` > len(plan) appends weight-0 dummy rows (padding only), e.g. to give every DP rank as many rows.
    """
    n_rows = len(plan) if n_rows is None else n_rows
    S = packed_sequence_size
    input_ids = torch.full((n_rows, S), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, S), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, S), dtype=torch.long)
    max_segments = max((len(r.sequences) for r in plan), default=0) + 2
    cu, cu_padded = torch.zeros((n_rows, max_segments), dtype=torch.int32), torch.zeros((n_rows, max_segments), dtype=torch.int32)
    for r, row in enumerate(plan):
        start = 0
        for k, i in enumerate(row.sequences):
            ids, labs = rows[i]["input_ids"], rows[i]["labels"]
            n, n_padded = len(ids), round_up(len(ids), multiple)
            input_ids[r, start:start + n] = torch.as_tensor(ids)
            labels[r, start:start + n] = torch.as_tensor(labs)
            position_ids[r, start:start + n_padded] = torch.arange(n_padded)
            cu[r, k + 1], cu_padded[r, k + 1] = cu[r, k] + n, cu_padded[r, k] + n_padded
            start += n_padded
        position_ids[r, start:] = torch.arange(S - start)  # the trailing padding is its own segment
        cu[r, len(row.sequences) + 1:] = cu[r, len(row.sequences)]
        cu_padded[r, len(row.sequences) + 1:] = S
    for r in range(len(plan), n_rows):  # dummy rows: one padding segment
        position_ids[r] = torch.arange(S)
        cu_padded[r, 1:] = S
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
             "cu_seqlens": cu, "cu_seqlens_padded": cu_padded}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["loss_mask"] = (batch["labels"] != IGNORE_INDEX).float()
    return batch
