"""ModelHandle: one model seen the same way whether it is one nn.Module or pipeline stages.

Code above the handle (policies, algorithms, checkpointing, export) never asks "is this pipelined?": it
calls `forward_backward` (training) and `forward_capture` (inference: the values it wants computed from
the logits, e.g. next tokens or per-token logprobs, on every rank) and reads `state_dict()` with the
unsplit model's parameter names. `ModelHandle` is the plain module; `PipelineModelHandle` the AutoPipeline
parts, whose schedule is driven by `automodel_mimo.parallel.pipeline_parallel`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from automodel_mimo.distributed.equal_steps import equal_step_count, weightless
from automodel_mimo.models.names import canonical_name

# loss_fn(logits, microbatch) -> (loss to backpropagate, metrics of this microbatch)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]
# capture_fn(logits, batch) -> one value row per batch row
CaptureFn = Callable[[torch.Tensor, dict], torch.Tensor]

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class ModelHandle:
    stage_group: dist.ProcessGroup | None = None  # pipeline stages to sum gradient norms over

    def __init__(self, module: nn.Module, dp_group: dist.ProcessGroup | None = None,
                 device: torch.device = torch.device("cpu")):
        self.parts: list[nn.Module] = [module]
        self.has_first_stage = True
        self.has_last_stage = True
        self.dp_group, self.device = dp_group, device

    @property
    def config(self):
        return self.parts[0].config

    # ------------------------------------------------------------ modes and parameters
    def train(self) -> "ModelHandle":
        for part in self.parts:
            part.train()
        return self

    def eval(self) -> "ModelHandle":
        for part in self.parts:
            part.eval()
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's own names (activation-checkpointing wrappers left out: see models/names.py)."""
        for part in self.parts:
            for name, param in part.named_parameters():
                yield canonical_name(name), param

    def reshard(self) -> None:
        """Drop the full parameters FSDP gathered for a forward. A forward without a backward (inference)
        leaves some gathered (the root, or every layer under pp), and the next forward would reuse them
        instead of the shards: call this before writing parameters in place (reference swap, refit)."""
        for part in self.parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # ------------------------------------------------------------ compute
    def _logits(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return self.parts[0](**inputs, use_cache=False).logits

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn) -> list[dict]:
        """Forward, loss and backward of each microbatch in turn; gradients accumulate in the parameters.

        FSDP reduce-scatters gradients only after the last microbatch (earlier ones accumulate unsharded).
        A rank with fewer microbatches than another data rank runs weight-0 dummies (their metrics are
        returned too, all zero-weight) so FSDP's collectives stay paired.
        """
        metrics = []
        microbatches = equal_step_count(microbatches, weightless(microbatches[0]), self.dp_group, self.device)
        for i, mb in enumerate(microbatches):
            self._gradient_sync(i == len(microbatches) - 1)
            loss, m = loss_fn(self._logits(mb), mb)
            loss.backward()
            metrics.append(m)
        return metrics

    def _gradient_sync(self, enabled: bool) -> None:
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(enabled)

    @torch.no_grad()
    def forward_capture(self, batch: dict, capture_fn: CaptureFn, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """capture_fn(logits, batch): one row of `row_shape`/`dtype` per batch row, on every rank."""
        return capture_fn(self._logits(batch), batch)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Sharded model state keyed by the unsplit model's names (DCP save/load of it reshards freely)."""
        merged = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(strict=False))

    def full_state_dict(self) -> dict:
        """Full tensors on CPU (collective: every rank calls it; rank 0 gets the values)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.parts[0], options=options)

    def load_full_state_dict(self, state: dict) -> None:
        """Copy full (unsharded) tensors into this rank's shards; every rank passes the same values."""
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(full_state_dict=True, strict=False))


class PipelineModelHandle(ModelHandle):
    """AutoPipeline parts of this rank's stage(s), driven through the schedule."""

    def __init__(self, driver, config):
        self.driver = driver
        info = driver.info
        self.parts = list(info.model_parts)
        self.has_first_stage, self.has_last_stage = info.has_first_stage, info.has_last_stage
        self.stage_group = driver.pp_group
        self._config = config

    @property
    def config(self):
        return self._config

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn) -> list[dict]:
        return self.driver.forward_backward(microbatches, loss_fn)

    @torch.no_grad()
    def forward_capture(self, batch: dict, capture_fn: CaptureFn, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return self.driver.forward_capture(batch, capture_fn, row_shape, dtype)

    def full_state_dict(self) -> dict:
        """Full tensors on rank 0: each stage gathers its own over dp/tp, then the stage leaders (the ranks
        in rank 0's pp group) send theirs to rank 0, one object per stage."""
        local = {}
        for part in self.parts:
            for name, value in part.state_dict().items():
                local[canonical_name(name)] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        group = self.driver.pp_group
        if 0 not in dist.get_process_group_ranks(group):
            return {}
        gathered = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
        dist.gather_object(local, gathered, dst=0, group=group)
        merged = {}
        for stage_state in gathered or []:
            merged.update(stage_state)
        return merged
