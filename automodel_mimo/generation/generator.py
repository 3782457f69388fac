"""The generator interface the RL loops program against, and the colocated wrapper over ranks.

A backend (`hf`, `vllm`) owns its own inference copy of the weights. The trainer describes its
weights once (`validate_manifest`) and refits them with `update_weights`, which consumes the verified
(name, tensor) stream of automodel_mimo.generation.weight_stream; `sleep`/`wake` release and restore
the backend's accelerator memory between rollouts where the backend supports it (no-ops otherwise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch

from automodel_mimo.generation.manifest import Manifest
from automodel_mimo.generation.sampling import Generation, PromptImages, SamplingParams


class Generator(ABC):
    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 images: PromptImages | None = None) -> list[Generation]:
        """n samples per prompt (prompt-major order) with per-token logprobs and finish reasons; `images`:
        each prompt's images (sampling.PromptImages) when the model is a MIMO (LLaVA) one."""

    @abstractmethod
    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The weights this generator loads, in its (HF checkpoint) naming: name -> (shape, dtype)."""

    def validate_manifest(self, manifest: Manifest) -> None:
        """Once at setup: the trainer's manifest must name exactly this generator's weights."""
        manifest.validate(self.parameter_specs())
        self.manifest = manifest

    @abstractmethod
    def update_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights in place from a verified (name, tensor) stream in manifest order."""

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (no-op where the backend has nothing to free)."""

    def wake(self) -> None:
        """Undo `sleep` before the next generate / update_weights."""

    def shutdown(self) -> None:
        """Release the backend's engine and processes."""


class Colocated:
    """A generator living in the trainer's processes: one engine on global rank `owner`.

    Every trainer rank calls `generate` with the same global prompt list and `refit` with its own
    WeightStream. The owner generates for all prompts and the results are broadcast (each rank then
    takes its data-parallel slice); refits stream once into the one engine. One engine rather than one
    per data-parallel rank: one engine start, one refit, and vLLM batches all prompts itself; a
    disaggregated generator (generation/remote.py, a Ray actor) is a backend on the owner that reaches a remote engine through
    the same broadcast transport.
    """

    def __init__(self, backend: Generator | None, owner: int = 0):
        import torch.distributed as dist

        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.owner = owner
        if (backend is not None) != (self.rank == owner):
            raise ValueError(f"rank {self.rank}: the backend must exist exactly on the owner rank {owner}")
        self.backend = backend

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 images: PromptImages | None = None) -> list[Generation]:
        import torch.distributed as dist

        result = [self.backend.generate(prompts, sampling, images) if self.backend is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(result, src=self.owner)
        return result[0]

    def validate_manifest(self, manifest: Manifest) -> None:
        if self.backend is not None:
            self.backend.validate_manifest(manifest)

    def refit(self, stream) -> None:
        """Collective: stream the trainer's current weights into the engine."""
        if self.backend is not None:
            self.backend.update_weights(stream)
        else:
            stream.participate()
