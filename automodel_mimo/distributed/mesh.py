"""Process group and the named DeviceMesh (pp, dp, cp, tp) every rank trains on.

The mesh itself comes from nemo-automodel's `MeshContext.build` (axes pp, dp_replicate, dp_shard, cp,
tp, with flattened dp / dp_shard_cp / dp_cp), which is also what its parallelizer and AutoPipeline
consume; `ParallelState` adds the rank facts and groups the training loop needs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from automodel_mimo.config import ParallelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the job described by RANK/WORLD_SIZE/MASTER_* (set by our launcher or torchrun)."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


@dataclass
class ParallelState:
    """What one rank needs to know about the layout."""

    mesh_context: object  # nemo_automodel MeshContext
    device: torch.device

    @property
    def mesh(self) -> DeviceMesh:
        return self.mesh_context.device_mesh

    def _axis(self, name: str) -> DeviceMesh:
        return self.mesh[name]

    @property
    def dp_size(self) -> int:
        return self._axis("dp").size()

    @property
    def dp_rank(self) -> int:
        return self._axis("dp").get_local_rank()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._axis("dp").get_group()

    @property
    def tp_size(self) -> int:
        return self._axis("tp").size()

    @property
    def cp_size(self) -> int:
        return self._axis("cp").size()

    @property
    def cp_rank(self) -> int:
        return self._axis("cp").get_local_rank()

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self._axis("cp").get_group()

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        """Ranks holding different data: global token counts and loss sums reduce over this group."""
        return self._axis("dp_cp").get_group()

    @property
    def pp_size(self) -> int:
        return self._axis("pp").size()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self._axis("pp").get_group()

    @property
    def is_rank0(self) -> bool:
        return dist.get_rank() == 0


def build_parallel_state(parallel: ParallelConfig, device: torch.device, dtype: str = "float32",
                         compile: bool = False) -> ParallelState:
    from nemo_automodel.components.distributed.config import FSDP2Config
    from nemo_automodel.components.distributed.mesh import MeshContext, ParallelismSizes

    # nemo's default policy computes in bf16; the numerics contract wants the model's own dtype with fp32
    # gradient reduction, so the policy is explicit.
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    strategy = FSDP2Config(mp_policy=policy, sequence_parallel=parallel.sequence_parallel, enable_compile=compile)
    sizes = ParallelismSizes(dp_size=parallel.dp, tp_size=parallel.tp, cp_size=parallel.cp, pp_size=parallel.pp)
    ctx = MeshContext.build(strategy, sizes, world_size=dist.get_world_size(),
                            activation_checkpointing=parallel.activation_checkpointing)
    if parallel.ep > 1:
        ctx.moe_mesh = expert_view(ctx, parallel, device)
    return ParallelState(mesh_context=ctx, device=device)


def expert_view(ctx, parallel: ParallelConfig, device: torch.device) -> DeviceMesh:
    """The expert factorization of the same ranks (docs/moe.md): pp x ep_shard x ep, ep innermost (consecutive
    ranks of a stage: cp, then dp), pp shared with the dense grid; nemo's MoE parallelizer reads its `ep` and
    `ep_shard` axes (the names nemo's own moe_mesh has)."""
    from automodel_mimo.distributed.grid_spec import LANGUAGE, GridSpec
    from automodel_mimo.distributed.grids import Grid

    sizes = {"pp": parallel.pp, "dp": parallel.dp, "cp": parallel.cp, "tp": parallel.tp}
    return grid_expert_view(Grid(GridSpec.for_module(LANGUAGE, sizes), ctx, device), parallel.ep, parallel.etp)


def grid_expert_view(grid, ep: int, etp: int = 1) -> DeviceMesh:
    """`expert_view` of a module grid (distributed/grids.py: an LM's, or a MIMO language module's)."""
    pp = grid.size("pp")
    per_stage = grid.spec.size // pp
    dims = (("pp", pp), ("ep_shard", per_stage // (etp * ep)), ("ep", ep))
    return grid.view("experts", dims, shared=("pp",))
