"""The refit manifest: the ordered list of weights the trainer will stream, in the generator's naming.

Built once at setup from the trainer's parameters (full shapes, the dtype the generator holds) and
validated once by the generator against its own parameters; every later refit streams exactly these
entries in this order, so the per-refit traffic carries no names at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ManifestMismatchError(ValueError):
    """The trainer's manifest and the generator's parameters disagree (names, shapes or dtypes)."""


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: int = 0  # global rank that packs and sends this entry (the lowest rank holding its group)
    group: int = 0  # its weight group (parameters the same ranks hold, e.g. a pipeline stage): buckets never mix groups

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class Manifest:
    entries: tuple[ManifestEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def validate(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Raise one ManifestMismatchError listing every missing, extra, duplicated or mis-shaped name.

        `expected` maps the generator's parameter names to (shape, dtype).
        """
        problems = []
        names = self.names()
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            problems.append(f"duplicated in the manifest: {duplicated}")
        missing = sorted(set(expected) - set(names))
        if missing:
            problems.append(f"generator parameters the manifest lacks: {missing}")
        extra = sorted(set(names) - set(expected))
        if extra:
            problems.append(f"manifest names the generator does not have: {extra}")
        for e in self.entries:
            if e.name not in expected:
                continue
            shape, dtype = expected[e.name]
            if tuple(shape) != e.shape:
                problems.append(f"{e.name}: manifest shape {list(e.shape)} != generator shape {list(shape)}")
            if dtype != e.dtype:
                problems.append(f"{e.name}: manifest dtype {e.dtype} != generator dtype {dtype}")
        if problems:
            raise ManifestMismatchError("weight manifest does not match the generator:\n  " + "\n  ".join(problems))
