"""A checkpoint's manifest: every file's size and xxh3-64 checksum, written into the checkpoint before it is
published, and checked before a resume trusts it.

A published checkpoint can still go bad on disk (a truncated or deleted shard, bytes overwritten); DCP
would load such bytes silently or fail with pages of traceback. The manifest turns both into a named
problem, so resume can fall back to an earlier checkpoint. These are the pure file operations; the
collective parts (ranks hash shares of the files) are in checkpoint.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash  # a dependency of `datasets`; xxh3 runs at memory speed, so hashing costs about one read

MANIFEST = "manifest.json"
_CHUNK = 4 << 20


def checkpoint_files(root: Path) -> list[str]:
    """Every file under `root` (relative posix paths, sorted), the manifest itself excluded."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entry(path: Path) -> dict:
    digest = xxhash.xxh3_64()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "xxh3_64": digest.hexdigest()}


def write_manifest(root: Path, files: dict[str, dict]) -> None:
    """Atomically: a torn manifest must never look like a valid one."""
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": dict(sorted(files.items()))}, indent=1))
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: Path) -> dict | None:
    """{relative path: entry}; None when the checkpoint has no manifest (written before manifests existed).
    Raises ValueError when the manifest itself is unreadable."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{MANIFEST} is unreadable ({type(e).__name__})") from None


def file_problem(root: Path, name: str, expected: dict) -> str | None:
    """What is wrong with file `name` against its manifest entry, or None."""
    path = root / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{name} has {size} bytes, the manifest says {expected['size']}"
    if file_entry(path)["xxh3_64"] != expected["xxh3_64"]:
        return f"{name} does not match its checksum"
    return None
