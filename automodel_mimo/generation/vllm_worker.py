"""Runs inside vLLM's worker process (loaded through `worker_extension_cls`): the generator end of the
refit. It joins a standalone broadcast group with the trainer's generator rank at setup, and on each refit
hands vLLM's in-place `reload_weights` a lazy iterator that receives and verifies bucket by bucket, so
the engine never holds more than two buckets of received bytes (plus the layer vLLM is assembling).
"""

from __future__ import annotations

import torch

from automodel_mimo.generation.bucketing import plan_buckets
from automodel_mimo.generation.manifest import Manifest, ManifestEntry
from automodel_mimo.generation.transport import generator_link
from automodel_mimo.generation.weight_stream import StreamPlan, broadcast_received, verified


def plan_to_wire(plan: StreamPlan) -> tuple:
    """Plain data for vLLM's RPC serializer (the worker rebuilds the same buckets from it)."""
    return ([(e.name, list(e.shape), str(e.dtype).removeprefix("torch."), e.source) for e in plan.manifest.entries],
            plan.bucket_bytes)


def plan_from_wire(wire: tuple) -> StreamPlan:
    entries, bucket_bytes = wire
    manifest = Manifest(tuple(ManifestEntry(n, tuple(s), getattr(torch, d), src) for n, s, d, src in entries))
    return StreamPlan(manifest, plan_buckets(manifest, bucket_bytes), bucket_bytes)


class RefitWorkerExtension:
    """Methods mixed into vLLM's worker class; called through `LLM.collective_rpc(name, args=...)`."""

    def join_refit_group(self, host: str, port: int, sources: list[int], backend: str) -> None:
        """Rank 1 of the standalone refit link with the trainer's generator rank (every source's buckets)."""
        self._refit_transport = generator_link(host, port, 1, sources, backend)

    def device_uuid(self) -> str:
        """The engine's GPU, so the trainer can tell whether it shares it (see VLLMGenerator._group_backend)."""
        return str(torch.cuda.get_device_properties(self._device()).uuid)

    def _device(self) -> torch.device:
        return next(self.model_runner.get_model().parameters()).device

    def receive_refit(self, wire_plan: tuple) -> int:
        plan = plan_from_wire(wire_plan)
        device = self._device()
        stream = verified(plan, broadcast_received(plan, self._refit_transport, device), clone=True)
        self.model_runner.reload_weights(weights_iterator=stream)
        return len(plan.buckets)
