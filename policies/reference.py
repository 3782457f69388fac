"""The reference policy without a second model: this rank's own parameter shards, copied to (pinned) CPU
memory, swapped into the live parameters for a reference pass and swapped back afterwards.

Works on whatever `handle.parameters()` holds on this rank: plain tensors, FSDP / TP DTensors (their local
shard), pipeline stages (each rank keeps the stages it owns) and a MIMO model's modules (encoder, projector and
LLM, each sharded over its own grid: tests/unit/test_mimo_dpo.py). Copies are exact, so the training weights
come back bit for bit. Before each write the handle drops FSDP's gathered full parameters, which an
inference forward leaves behind and the next forward would otherwise reuse (stale) instead of the shards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(param: nn.Parameter) -> torch.Tensor:
    """The storage this rank owns: the local shard of a DTensor, else the tensor itself."""
    return param.to_local() if isinstance(param, DTensor) else param.data


def _cpu_copies(params: list[nn.Parameter]) -> list[torch.Tensor]:
    pin = torch.cuda.is_available()
    copies = []
    for p in params:
        local = _local(p).detach()
        copy = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
        copy.copy_(local)
        copies.append(copy)
    return copies


class ReferenceWeights:
    """A frozen copy of the handle's local parameter shards (taken at construction), swappable into them."""

    def __init__(self, handle):
        self.handle = handle
        self.params = list(handle.parameters())
        self.weights = _cpu_copies(self.params)
        self._stash: list[torch.Tensor] | None = None  # training weights while swapped in (allocated once)

    @classmethod
    def from_full_state_dict(cls, handle, state: dict) -> "ReferenceWeights":
        """Reference weights from full (unsharded) tensors, e.g. another checkpoint; the handle's own
        weights are unchanged afterwards."""
        current = cls(handle)
        handle.reshard()
        handle.load_full_state_dict(state)
        reference = cls(handle)
        current._write(current.weights)
        return reference

    @torch.no_grad()
    def _write(self, source: list[torch.Tensor]) -> None:
        self.handle.reshard()
        for p, value in zip(self.params, source):
            _local(p).copy_(value, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned source may be rewritten right after

    @torch.no_grad()
    def capture(self) -> None:
        """Take the parameters' current values as the reference (inside `swapped_in`: values loaded into the
        parameters become the reference, and the training weights come back on exit)."""
        for copy, p in zip(self.weights, self.params):
            copy.copy_(_local(p))

    @contextmanager
    def swapped_in(self):
        """Within the block the parameters hold the reference weights; afterwards the training weights."""
        with torch.no_grad():
            if self._stash is None:
                self._stash = _cpu_copies(self.params)
            else:
                for stash, p in zip(self._stash, self.params):
                    stash.copy_(_local(p))
        self._write(self.weights)
        try:
            yield self
        finally:
            self._write(self._stash)
