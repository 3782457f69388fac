"""What a data.dataset string names, decided without loading anything: a synthetic task, a local file or
directory, or a hub dataset."""

from __future__ import annotations

from pathlib import Path

SYNTHETIC_PREFIX = "synthetic:"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in FILE_BUILDERS
