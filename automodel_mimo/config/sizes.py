"""Sizes derived from the config that the data path shares (packed rows, CP/SP padding)."""

from __future__ import annotations

from automodel_mimo.config.schema import DataConfig, ParallelConfig


def packed_row_size(d: DataConfig) -> int:
    """Tokens per packed row: data.packed_sequence_size, or data.max_seq_len when it is unset."""
    return d.packed_sequence_size or d.max_seq_len


def pad_multiple(p: ParallelConfig) -> int:
    """Every packed sequence is padded to this: 2*cp load-balanced CP chunks, x tp under sequence parallel."""
    return (2 * p.cp if p.cp > 1 else 1) * (p.tp if p.sequence_parallel else 1)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
