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
- For the RL losses, which need one sequence per row, a packed microbatch also carries `seq_index`
  [R, K, L]: for slot k of packed row r (its k-th sequence, K slots per row), the whole-row position of
  each of the sequence's L tokens (-1 past its end or for an empty slot). `to_sequences` is the
  differentiable gather it drives, [R, S] -> [R*K, L]; per-sequence side data rides in slot layout
  [R, K, ...] so it is sliced by packed row like every other key (pipeline microbatches are row slices).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from automodel_mimo.config import round_up
from automodel_mimo.errors import UserInputError
from automodel_mimo.losses import IGNORE_INDEX


@dataclass
class PackedRow:
    sequences: list[int] = field(default_factory=list)  # indices into the input rows
    used: int = 0  # padded tokens placed so far


def pack(lengths: list[int], packed_sequence_size: int, multiple: int = 1, group: int = 1) -> list[PackedRow]:
    """First-fit-decreasing assignment of sequences (by padded length) to rows. `group` > 1 keeps every run
    of `group` consecutive sequences (a DPO pair: group=2) together, in order, in one row."""
    if packed_sequence_size % multiple:
        raise UserInputError(
            f"data.packed_sequence_size={packed_sequence_size} must be a multiple of {multiple} "
            "(2 * parallel.cp, times parallel.tp with sequence parallelism)")
    padded = [round_up(n, multiple) for n in lengths]
    units = [sum(padded[u:u + group]) for u in range(0, len(lengths), group)]
    rows: list[PackedRow] = []
    for u in sorted(range(len(units)), key=lambda u: (-units[u], u)):
        if units[u] > packed_sequence_size:
            what = (f"a sequence of {lengths[u]} tokens" if group == 1 else
                    f"{group} sequences kept in one row (e.g. a DPO pair) of {lengths[u * group:(u + 1) * group]} tokens")
            raise UserInputError(
                f"{what} (padded to {units[u]}) does not fit in a packed row of data.packed_sequence_size="
                f"{packed_sequence_size}; raise data.packed_sequence_size or lower data.max_seq_len")
        row = next((r for r in rows if r.used + units[u] <= packed_sequence_size), None)
        if row is None:
            row = PackedRow()
            rows.append(row)
        row.sequences.extend(range(u * group, min((u + 1) * group, len(lengths))))
        row.used += units[u]
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


# ---------------------------------------------------------------- one sequence per row (RL losses)


def sequence_index(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    """[R, K, L] whole-row positions of every sequence's tokens (K: most sequences in a row, L: longest
    sequence), -1 past a sequence's end and in empty slots (rows with fewer sequences)."""
    lengths = (cu_seqlens[:, 1:] - cu_seqlens[:, :-1]).long()  # true lengths; 0 for the padding segments
    K = max(1, int((lengths > 0).sum(1).max()))
    L = max(1, int(lengths.max()))
    offsets = torch.arange(L, device=cu_seqlens.device)
    positions = cu_seqlens_padded[:, :K, None].long() + offsets
    return torch.where(offsets < lengths[:, :K, None], positions, -1)


def to_sequences(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Whole packed rows [R, S] -> one row per sequence slot [R*K, L] (0 off the sequence); differentiable."""
    R, K, L = index.shape
    index = index.to(values.device).reshape(R, K * L)
    picked = values.gather(1, index.clamp(min=0))
    return torch.where(index >= 0, picked, torch.zeros_like(picked)).reshape(R * K, L)


ROW_LAYOUT_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens", "cu_seqlens_padded", "seq_index")


def per_sequence(mb: dict) -> dict:
    """A packed microbatch (`loss_mask` in whole rows) as one sequence per row: `loss_mask` gathered to
    [R*K, L], and every side key in slot layout [R, K, ...] flattened to [R*K, ...]; the row layout's own
    keys stay as they are."""
    index = mb["seq_index"]
    slots = tuple(index.shape[:2])
    out = {k: (v.flatten(0, 1) if k not in ROW_LAYOUT_KEYS and v.ndim >= 2 and tuple(v.shape[:2]) == slots else v)
           for k, v in mb.items()}
    out["loss_mask"] = to_sequences(mb["loss_mask"], index)
    return out


def pack_microbatches(rows: list[dict], packed_sequence_size: int, multiple: int, micro_rows: int, pad_id: int,
                      device: torch.device | str = "cpu", group: int = 1) -> list[tuple[dict, list[list[int]]]]:
    """Pack `rows` (runs of `group` kept in one row) and cut the packed rows into microbatches of
    `micro_rows`, each with its `seq_index`; beside each, its rows' sequences (indices into `rows`) in slot
    order, for side data in slot layout."""
    plan = pack([len(r["input_ids"]) for r in rows], packed_sequence_size, multiple, group)
    out = []
    for start in range(0, len(plan), micro_rows):
        part = plan[start:start + micro_rows]
        mb = collate_packed(rows, part, packed_sequence_size, multiple, pad_id, device=device)
        mb["seq_index"] = sequence_index(mb["cu_seqlens"], mb["cu_seqlens_padded"])
        out.append((mb, [r.sequences for r in part]))
    return out
