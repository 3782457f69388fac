"""A disaggregated generator: the engine (`hf` or `vllm` backend) lives in a Ray actor, not in a trainer rank.

`RemoteGenerator` is the trainer source rank's view of it and implements the Generator interface, so
`Colocated` wraps it exactly like a local engine (rank 0 drives it, results are broadcast to the ranks).
Refits use the broadcast transport: at the first refit the trainer's source rank hosts a standalone
2-member process group (TCPStore on its node) that the generator end joins as rank 1 — the actor itself
for `hf`, the vLLM engine's worker process for `vllm` (through `collective_rpc`, as in the colocated
vLLM refit) — and each refit broadcasts the checksummed buckets while the actor feeds the verified stream
into the engine. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import torch

from automodel_mimo.generation.generator import Generator
from automodel_mimo.generation.sampling import Generation, SamplingParams
from automodel_mimo.generation.transport import BroadcastTransport, generator_link


def _group_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


class GeneratorActor:
    """Runs inside the Ray actor: builds the backend from the exported HF folder and serves it."""

    def __init__(self, backend: str, model_path: str, kwargs: dict):
        from automodel_mimo.generation import build_generator
        from automodel_mimo.run.quiet import quiet_third_party

        quiet_third_party()
        if backend == "hf" and torch.cuda.is_available():
            kwargs = {**kwargs, "device": "cuda"}  # the actor's own GPU
        self.name = backend
        self.engine = build_generator(backend, model_path, **kwargs)
        self.transport: BroadcastTransport | None = None

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, images=None) -> list[Generation]:
        return self.engine.generate(prompts, sampling, images)

    def parameter_specs(self) -> dict:
        return self.engine.parameter_specs()

    def join_refit_group(self, host: str, port: int, sources: list[int], backend: str) -> None:
        if self.name == "vllm":  # the engine's worker process is the receiving end
            self.engine.llm.collective_rpc("join_refit_group", args=(host, port, sources, backend))
            return
        self.transport = generator_link(host, port, 1, sources, backend)

    def receive_refit(self, wire_plan: tuple) -> None:
        if self.name == "vllm":
            self.engine.llm.collective_rpc("receive_refit", args=(wire_plan,))
            self.engine.llm.reset_prefix_cache()
            return
        from automodel_mimo.generation.vllm_worker import plan_from_wire
        from automodel_mimo.generation.weight_stream import broadcast_received, verified

        plan = plan_from_wire(wire_plan)
        device = next(self.engine.model.parameters()).device
        self.engine.update_weights(verified(plan, broadcast_received(plan, self.transport, device)))

    def shutdown(self) -> None:
        self.engine.shutdown()


class RemoteGenerator(Generator):
    """Trainer side: one GeneratorActor, created by (and dying with) the calling trainer rank's process."""

    def __init__(self, backend: str, model_path: str, num_cpus: int = 1, **kwargs):
        import ray

        num_gpus = 1 if torch.cuda.is_available() else 0
        actor_cls = ray.remote(GeneratorActor).options(num_cpus=num_cpus, num_gpus=num_gpus)
        self.actor = actor_cls.remote(backend, model_path, kwargs)
        self._transport: BroadcastTransport | None = None

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, images=None) -> list[Generation]:
        return self._call("generate", prompts, sampling, images)

    def parameter_specs(self) -> dict:
        return self._call("parameter_specs")

    def _connect(self, sources: list[int]) -> None:
        import ray

        from automodel_mimo.launch.local import free_port

        host, backend = ray.util.get_node_ip_address(), _group_backend()
        port = free_port()
        joined = self.actor.join_refit_group.remote(host, port, sources, backend)
        self._transport = generator_link(host, port, 0, sources, backend)
        ray.get(joined)

    def update_weights(self, stream) -> None:
        """On the trainer's generator rank, while the other ranks run `stream.participate()` (under pp this
        rank relays the other stages' buckets)."""
        import ray

        from automodel_mimo.generation.vllm_worker import plan_to_wire

        stream.check()  # a refused refit raises here on every rank, before the actor waits for buckets
        if self._transport is None:
            self._connect(stream.plan.sources)
        received = self.actor.receive_refit.remote(plan_to_wire(stream.plan))
        stream.send(self._transport)
        ray.get(received)

    def shutdown(self) -> None:
        import ray

        try:
            self._call("shutdown")
        finally:
            ray.kill(self.actor)
