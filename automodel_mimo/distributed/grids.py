"""Heterogeneous grids: one rank layout per MIMO module (encoders, projectors, the language model).

The specs and their checks are pure arithmetic (distributed/grid_spec.py).

`build_grids` then creates every grid's groups in one world-consistent order (every rank builds every
grid, same order, even groups it is not in). A module grid's groups are those of nemo-automodel's
`MeshContext` over the same ranks with the grid's sizes — the mesh its `parallelize_model` (FSDP2 + TP)
consumes — and `Grid` asserts that nemo enumerates each dim's ranks exactly as the spec does.

Views (`Grid.view`) are second factorizations of the same ranks that share chosen dims with the base,
e.g. an expert view etp x ep x edp == tp x cp x dp; a shared dim must group ranks identically in both.

Scope now: colocated layouts (every module spans all ranks) and non-colocated ones (disjoint rank ranges
`offset .. offset + size - 1` covering the world; a rank then holds one module, and its Grid of any other
module is a non-member: no coordinates, no groups), encoders with pp == 1, the LLM with any pp x tp x cp x dp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from automodel_mimo.distributed.grid_spec import GridSpec, check_view, validate_layout
from automodel_mimo.distributed.mesh import DTYPES, ParallelState
from automodel_mimo.distributed.subset_mesh import make_flattened_dims_sliceable


# ---------------------------------------------------------------- grids with process groups


class Grid:
    """A module's grid on this rank: its spec, nemo MeshContext (for parallelize_model) and groups."""

    def __init__(self, spec: GridSpec, mesh_context, device: torch.device):
        self.spec, self.mesh_context, self.device = spec, mesh_context, device
        self.rank = dist.get_rank()
        self.member = spec.holds(self.rank)
        self.coords = spec.coords(self.rank) if self.member else None
        for dim in spec.names if self.member else ():  # nemo's rank enumeration must be the spec's
            nemo = dist.get_process_group_ranks(self.group(dim))
            expected = spec.group_of(self.rank, dim)
            assert nemo == expected, f"grid {spec.name}: nemo's {dim} group is {nemo}, the spec says {expected}"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def mesh(self) -> DeviceMesh:
        return self.mesh_context.device_mesh

    def size(self, dim: str) -> int:
        return self.spec.dim_size(dim)

    def local_rank(self, dim: str) -> int:
        return self.coords[dim]

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh[dim].get_group()

    def parallel_state(self) -> ParallelState:
        return ParallelState(mesh_context=self.mesh_context, device=self.device)

    def view(self, name: str, dims: tuple[tuple[str, int], ...], shared: tuple[str, ...]) -> DeviceMesh:
        """A second factorization of this grid's ranks sharing `shared` dims (collective: every rank, same order)."""
        view = GridSpec(name, dims, self.spec.offset)
        check_view(self.spec, view, shared)
        return DeviceMesh(self.mesh.device_type, view.rank_tensor(), mesh_dim_names=view.names)


def build_grids(specs: list[GridSpec], device: torch.device, dtype: str = "float32",
                global_batch_size: int | None = None, tp_plans: dict | None = None, compile: bool = False,
                activation_checkpointing: bool = False) -> dict[str, Grid]:
    """Validate, then build every module's MeshContext in spec order on every rank (world-consistent). `compile`
    (train.compile) and `activation_checkpointing` (parallel.activation_checkpointing) reach each module's
    parallelize, which compiles its transformer layers (models/build.py) and checkpoints them (nemo-automodel)."""
    from nemo_automodel.components.distributed.config import FSDP2Config
    from nemo_automodel.components.distributed.mesh import MeshContext, ParallelismSizes
    from torch.distributed.fsdp import MixedPrecisionPolicy

    world = dist.get_world_size()
    validate_layout(specs, world, global_batch_size)
    grids = {}
    for spec in specs:
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
        strategy = FSDP2Config(mp_policy=policy, tp_plan=(tp_plans or {}).get(spec.name), enable_compile=compile)
        sizes = ParallelismSizes(dp_size=spec.dim_size("dp"), tp_size=spec.dim_size("tp"),
                                 cp_size=spec.dim_size("cp"), pp_size=spec.dim_size("pp"))
        ranks = list(range(spec.offset, spec.offset + spec.size))
        # A whole-world grid takes nemo's plain init_device_mesh path (the LM's): its explicit-ranks path
        # registers flattened dims that torch 2.11 refuses to slice ("only allows slicing out a contiguous
        # flattened dim", seen on 4 x H200); torch 2.13 accepts both.
        whole_world = ranks == list(range(world))
        ctx = MeshContext.build(strategy, sizes, world_size=spec.size, ranks=None if whole_world else ranks,
                                activation_checkpointing=activation_checkpointing)
        if not whole_world and spec.holds(dist.get_rank()):
            make_flattened_dims_sliceable(ctx.device_mesh)
        grids[spec.name] = Grid(spec, ctx, device)
    return grids

