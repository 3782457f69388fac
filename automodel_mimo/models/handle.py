"""ModelHandle: one model seen the same way whether it is one nn.Module or pipeline stages.

Code above the handle (policies, algorithms, checkpointing, export) never asks "is this pipelined?":
it calls `forward_backward` / `forward` and reads `state_dict()` with the unsplit model's parameter
names. This file implements the plain-module case; pipeline stages (nemo-automodel AutoPipeline parts)
plug in behind the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

# loss_fn(logits, microbatch) -> (loss to backpropagate, metrics of this microbatch)
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class ModelHandle:
    def __init__(self, module: nn.Module):
        self.parts: list[nn.Module] = [module]
        self.has_first_stage = True
        self.has_last_stage = True

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
        for part in self.parts:
            yield from part.named_parameters()

    # ------------------------------------------------------------ compute
    def _logits(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return self.parts[0](**inputs, use_cache=False).logits

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn) -> list[dict]:
        """Forward, loss and backward of each microbatch in turn; gradients accumulate in the parameters.

        FSDP reduce-scatters gradients only after the last microbatch (earlier ones accumulate unsharded).
        """
        metrics = []
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
    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (a vocab-sharded DTensor under TP) for evaluation and generation."""
        return self._logits(batch)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Sharded model state keyed by the unsplit model's names (DCP save/load of it resharded freely)."""
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
        merged = {}
        for part in self.parts:
            merged.update(get_model_state_dict(part, options=options))
        return merged

    def load_full_state_dict(self, state: dict) -> None:
        """Copy full (unsharded) tensors into this rank's shards; every rank passes the same values."""
        for part in self.parts:
            set_model_state_dict(part, state, options=StateDictOptions(full_state_dict=True, strict=False))
