"""Layouts of MIMO modules as pure arithmetic, before any process group exists.

A `GridSpec` is a module's contiguous rank range (offset, size) factored into named dims, outermost first.
Everything about it is arithmetic on the rank tensor `arange(offset, offset + size).reshape(sizes)`: which
ranks share a dim (`groups_along`), a rank's coordinates, the data-parallel blocks. `validate_layout` checks a
whole layout that way (the CLI calls it before any rank starts), so a bad layout fails identically everywhere.
Process groups over these specs: distributed/grids.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from automodel_mimo.errors import UserInputError

# nemo's MeshContext lays ranks out as (pp, dp_replicate, dp_shard, cp, tp), tp innermost; with
# dp_replicate = 1 that is this order, which every module grid uses.
MODULE_DIMS = ("pp", "dp", "cp", "tp")
LANGUAGE = "language"


@dataclass(frozen=True)
class GridSpec:
    """One module's ranks: `dims` are (name, size) pairs, outermost first."""

    name: str
    dims: tuple[tuple[str, int], ...]
    offset: int = 0

    @classmethod
    def for_module(cls, name: str, sizes: dict[str, int]) -> "GridSpec":
        """From a `mimo.layout.<module>` mapping: dims, and `offset` (the module's first rank, default 0)."""
        return cls(name, tuple((d, int(sizes.get(d, 1))) for d in MODULE_DIMS), int(sizes.get("offset", 0)))

    def holds(self, rank: int) -> bool:
        return self.offset <= rank < self.offset + self.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.dims)

    @property
    def size(self) -> int:
        return math.prod(s for _, s in self.dims)

    def dim_size(self, dim: str) -> int:
        return dict(self.dims)[dim]

    def rank_tensor(self) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.size).reshape([s for _, s in self.dims])

    def groups_along(self, dim: str) -> list[list[int]]:
        """Every group of ranks that differ only in `dim` (each in `dim` order), in a fixed order."""
        t = self.rank_tensor().movedim(self.names.index(dim), -1)
        return t.reshape(-1, self.dim_size(dim)).tolist()

    def group_of(self, rank: int, dim: str) -> list[int]:
        return next(g for g in self.groups_along(dim) if rank in g)

    def coords(self, rank: int) -> dict[str, int]:
        index = (self.rank_tensor() == rank).nonzero()[0].tolist()
        return dict(zip(self.names, index))

    def dp_blocks(self) -> list[set[int]]:
        """Ranks of each dp index (contiguous blocks when pp=1; under pp a block spans every stage), in dp order."""
        t = self.rank_tensor().movedim(self.names.index("dp"), 0)
        return [set(block.reshape(-1).tolist()) for block in t]


# ---------------------------------------------------------------- validation (no process group needed)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserInputError(message)


def is_colocated(specs: list[GridSpec], world: int) -> bool:
    """Every module on every rank (as opposed to disjoint rank ranges, one module per rank)."""
    return all(s.offset == 0 and s.size == world for s in specs)


def _check_placement(specs: list[GridSpec], world: int) -> None:
    """Colocated (every module spans ranks 0..world-1) or non-colocated (pairwise disjoint ranges covering the
    world); anything else is refused with the ranges that are wrong."""
    if is_colocated(specs, world):
        return
    spans = ", ".join(f"{s.name} on ranks {s.offset}..{s.offset + s.size - 1} (offset={s.offset}, dp*tp*cp*pp={s.size})"
                      for s in specs)
    fix = (f"either every module spans all {world} ranks (offset 0, dp*tp*cp*pp = {world}: colocated) or the modules' "
           f"ranges offset..offset+dp*tp*cp*pp-1 are disjoint and together cover ranks 0..{world - 1} (non-colocated)")
    covered = sorted(r for s in specs for r in range(s.offset, s.offset + s.size))
    _require(all(s.offset >= 0 for s in specs), f"mimo.layout: an offset is negative ({spans}); {fix}")
    _require(len(covered) == len(set(covered)), f"mimo.layout: module rank ranges overlap ({spans}); {fix}")
    _require(covered == list(range(world)),
             f"mimo.layout: module rank ranges do not cover ranks 0..{world - 1} exactly ({spans}); {fix}")


def validate_layout(specs: list[GridSpec], world: int, global_batch_size: int | None = None) -> None:
    """Every check that can fail, before any group exists (so every rank raises the same error)."""
    names = [s.name for s in specs]
    _require(len(set(names)) == len(names), f"mimo.layout: module names repeat: {names}")
    _require(LANGUAGE in names, f"mimo.layout.{LANGUAGE}: missing; the language model's layout is required")
    for s in specs:
        key = f"mimo.layout.{s.name}"
        missing = [d for d in MODULE_DIMS if d not in s.names]
        _require(not missing, f"{key}: dims {missing} missing (a module grid has {', '.join(MODULE_DIMS)})")
        for d, size in s.dims:
            _require(size >= 1, f"{key}.{d}={size}: must be >= 1")
        if s.name != LANGUAGE:
            _require(s.dim_size("pp") == 1, f"{key}.pp={s.dim_size('pp')}: encoders are not pipelined (every rank "
                     "runs the whole encoder); set pp=1 (only mimo.layout.language.pp may be > 1)")
        if s.name != LANGUAGE:
            _require(s.dim_size("cp") == 1, f"{key}.cp={s.dim_size('cp')}: encoders do not shard the sequence; set cp=1")
    _check_placement(specs, world)
    language = next(s for s in specs if s.name == LANGUAGE)
    for s in specs:
        if s.name != LANGUAGE:
            check_nesting(s, language, is_colocated(specs, world))
    if global_batch_size is not None:  # the LLM splits rows over its dp; encoders split images, not rows
        lm_dp = language.dim_size("dp")
        _require(global_batch_size % lm_dp == 0,
                 f"train.global_batch_size={global_batch_size} is not divisible by mimo.layout.{LANGUAGE}.dp={lm_dp}: "
                 f"the language model splits the batch's rows over its dp ranks; use a multiple of {lm_dp}")


def check_nesting(encoder: GridSpec, language: GridSpec, colocated: bool = True) -> None:
    """Each dp block of the coarser grid must be the union of `scale` dp blocks of the finer: consecutive ones
    when both grids are pp=1; under LLM pp (pp outermost) the LLM's dp blocks hold ranks of every stage, so an
    encoder's blocks nest in them strided (vision dp4 in language pp2 x dp2: {0, 2} = {0} + {2}).
    Non-colocated grids share no ranks: coarse dp block b is fine dp blocks b*scale .. b*scale+scale-1 by
    definition (mimo/relay.py), so only the ratio is checked."""
    e, lm = encoder.dim_size("dp"), language.dim_size("dp")
    fine, coarse = (encoder, language) if e >= lm else (language, encoder)
    bad = (f"mimo.layout: the dp blocks of '{encoder.name}' (dp={e}) and '{language.name}' (dp={lm}) do not nest: "
           f"each dp block of the grid with fewer dp ranks must be the union of consecutive dp blocks of the other")
    _require(max(e, lm) % min(e, lm) == 0, bad + f"; make one dp a multiple of the other ({max(e, lm)} % {min(e, lm)} != 0)")
    if not colocated:
        return
    scale = max(e, lm) // min(e, lm)
    fine_blocks = fine.dp_blocks()
    for block in coarse.dp_blocks():
        inside = [b for b in fine_blocks if b <= block]
        _require(len(inside) == scale and block == set().union(*inside), bad + " (keep dp the outermost dim of both grids)")


def check_view(base: GridSpec, view: GridSpec, shared: tuple[str, ...]) -> None:
    _require(view.size == base.size,
             f"view {view.name}: {' x '.join(f'{d}{s}' for d, s in view.dims)} = {view.size} ranks, but grid "
             f"{base.name} has {base.size}")
    for dim in shared:
        _require(dim in view.names and dim in base.names, f"view {view.name}: shared dim '{dim}' missing")
        _require(sorted(map(sorted, view.groups_along(dim))) == sorted(map(sorted, base.groups_along(dim))),
                 f"view {view.name}: dim '{dim}' groups ranks differently than grid {base.name}; "
                 "shared dims must enumerate ranks identically (keep them at the same nesting level)")
