"""SFT training throughput: this project's trainer beside a plain FSDP2 loop, on identical rows, in one run.

  torchrun --nproc_per_node=1 bench/sft_throughput.py --model 1b [--variants ours,ours_compile,plain,plain_compile]
  torchrun --nproc_per_node=1 bench/sft_throughput.py --model 8b-128k --ac --rows 4
  torchrun --nproc_per_node=1 bench/sft_throughput.py --model tiny --steps 2    # CPU smoke
  torchrun --nproc_per_node=2 bench/sft_throughput.py --model 1b --rows 16       # dp2: ours and plain, FSDP over 2
  torchrun --nproc_per_node=2 bench/sft_throughput.py --model 1b --rows 16 --pp 2 --variants ours_compile  # pp2, 1F1B

Every variant trains the same random-init Llama (bf16 compute, fp32 master weights, AdamW, clip 1.0) on the same
full rows of --seq tokens, --rows per optimizer step (global). Data parallel ranks (every rank unless --pp) take
--rows / dp rows each, --micro rows per forward/backward; under --pp the pipeline runs one schedule step over the
rows with --micro rows per pipeline microbatch (the plain loop is data parallel only):
- ours / ours_compile: the project's Policy over its ModelHandle (models/build.py: nemo-automodel's parallelizer,
  FSDP2, train.compile off / on), `sft_train_step`, everything the CLI's step does (global token counts, loss
  view, grad norm, non-finite vote, clip, fused AdamW on CUDA);
- plain / plain_compile: HF's model and loss, `fully_shard` per decoder layer and the root (same mixed-precision
  policy), fused AdamW, clip_grad_norm_; compile = `layer.compile()` per decoder layer before sharding.
Reported per variant: median step time over --steps after --warmup, tokens/s, MFU, peak memory.
MFU = (6 N tokens + 6 layers hidden sum(L^2)) / time / (peak x GPUs), N without the input embedding, peak 989
TFLOP/s (H200 dense bf16). --profile writes where one step's GPU time goes, by kernel family, per variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

PEAK_FLOPS = 989e12
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b-128k": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
KERNEL_FAMILIES = (  # first match wins; names of CUDA kernels as the profiler reports them
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")),
    ("optimizer", ("adam",)),
    ("communication", ("nccl",)),
    ("copy/cast", ("copy", "memcpy", "memset", "to_copy")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
    ("compiled (triton)", ("triton",)),
)


def model_flops(cfg: dict, rows: int, seq: int) -> float:
    """Training FLOPs of one step: 6 N per token (N without the input embedding) + causal attention."""
    h, layers, inter, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = h * (2 * h + 2 * kv) + 3 * h * inter + 2 * h
    n = layers * per_layer + h + h * v
    return 6 * n * rows * seq + 6 * layers * h * rows * seq * seq


def make_rows(vocab: int, rows: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(rows):
        ids = torch.randint(1, vocab, (seq,), generator=g)
        out.append({"input_ids": ids.tolist(), "labels": ids[1:].tolist() + [-100]})
    return out


def new_model(cfg: dict, seq: int, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", max_position_embeddings=seq, tie_word_embeddings=False, **cfg)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def ours(args, cfg: dict, device, microbatches: list[dict], compile: bool):
    """The project's step: Policy.sft_train_step over the ModelHandle the CLI builds."""
    from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.models.build import build_handle
    from policies.policy import Policy

    world = dist.get_world_size()
    run = RunConfig(parallel=ParallelConfig(dp=world // args.pp, pp=args.pp, pp_microbatch_size=args.micro,
                                            pp_schedule=args.pp_schedule,
                                            activation_checkpointing=args.ac),
                    model=ModelConfig(config=cfg, dtype=args.dtype),
                    train=TrainConfig(max_steps=1000, global_batch_size=args.rows, micro_batch_size=microbatch_rows(args),
                                      lr=1e-5, warmup_steps=0, compile=compile))
    run.data.max_seq_len = args.seq
    state = build_parallel_state(run.parallel, device, run.model.dtype, compile=compile)
    policy = Policy(build_handle(run, new_model(cfg, args.seq, device), state, pad_id=0), run.train)
    return lambda: float(policy.sft_train_step(microbatches)["loss"])


def plain(args, cfg: dict, device, microbatches: list[dict], compile: bool):
    """A plain FSDP2 loop: HF model and loss, fully_shard per layer + root, fused AdamW, clip."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = new_model(cfg, args.seq, device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, args.dtype), reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if args.ac:
            layer = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            layers[i] = layer
        if compile:
            layer.compile()
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda" or None)
    batches = [{"input_ids": mb["input_ids"], "labels": mb["input_ids"]} for mb in microbatches]

    def step():
        total = 0.0
        for mb in batches:
            loss = model(**mb).loss / len(batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total)

    return step


def microbatch_rows(args) -> int:
    """Rows per forward/backward of one rank: --micro, or under pp one schedule step over this replica's rows."""
    return args.rows // (dist.get_world_size() // args.pp) if args.pp > 1 else args.micro


def timed(step, device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Step times after the warm-up, and every step's loss (compiled and eager variants must agree)."""
    times, losses = [], []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def kernel_profile(step, device, families=KERNEL_FAMILIES) -> dict:
    """GPU time of one step by kernel family (ms; `families`: first match wins), and the 15 costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_family: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0)
        if us <= 0:
            continue
        name = e.key.lower()
        family = next((f for f, keys in families if any(k in name for k in keys)), "other elementwise")
        by_family[family] = by_family.get(family, 0.0) + us / 1e3
        kernels.append((us / 1e3, e.key[:100]))
    kernels.sort(reverse=True)
    return {"by_family_ms": dict(sorted(by_family.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [[round(ms, 2), k] for ms, k in kernels[:15]]}


def host_profile(step) -> list:
    """The 20 host-side ops with the most self CPU time in one step (where a GPU-idle gap comes from)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [[round(e.self_cpu_time_total / 1e3, 2), e.count, e.key[:90]] for e in events[:20]]


def gpu_gaps(step, min_ms: float = 0.2) -> dict:
    """Where the GPU idles in one step: the gaps between kernels (all streams merged) longer than `min_ms`, each
    with the host ops that ran during it (by overlap), the largest first; total idle from the step's first host
    op to its last kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    host = [e for e in events if e.device_type == DeviceType.CPU]
    start = min(e.time_range.start for e in host)
    gaps, cursor = [], start
    for a, b in kernels:
        if a - cursor > min_ms * 1e3:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    out = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        overlap: dict[str, float] = {}
        for e in host:
            o = min(b, e.time_range.end) - max(a, e.time_range.start)
            if o > 0:
                overlap[e.name] = overlap.get(e.name, 0.0) + o
        top = sorted(overlap.items(), key=lambda kv: -kv[1])[:8]
        out.append({"at_ms": round((a - start) / 1e3, 2), "idle_ms": round((b - a) / 1e3, 2),
                    "host_ops_ms": [[n[:70], round(o / 1e3, 2)] for n, o in top]})
    return {"step_ms": round((cursor - start) / 1e3, 1), "idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 1),
            "gaps": len(gaps), "largest": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--variants", default="ours,ours_compile,plain,plain_compile")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per row")
    ap.add_argument("--rows", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--micro", type=int, default=1, help="rows per forward/backward (under --pp: per pipeline microbatch)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages of the 'ours' variants; dp = ranks / pp")
    ap.add_argument("--pp-schedule", default="1f1b", help="parallel.pp_schedule under --pp (1f1b | interleaved1f1b)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per decoder layer")
    ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--profile", action="store_true", help="GPU time of one step by kernel family")
    ap.add_argument("--host-profile", action="store_true", help="host-side ops of one step (CPU time)")
    ap.add_argument("--gaps", action="store_true", help="where the GPU idles in one step, with the host ops then")
    ap.add_argument("--memory-trace", metavar="DIR", help="the allocator's trace of one step per variant: a summary "
                    "by call site in the results, the trace gzip-pickled to DIR/<variant>.pickle.gz")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from automodel_mimo.data.batching import collate, split_microbatches
    from automodel_mimo.distributed.mesh import init_distributed
    from automodel_mimo.run.quiet import quiet_third_party

    quiet_third_party()
    device = init_distributed("auto")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu" and args.model == "tiny":
        args.seq = min(args.seq, 128)
    cfg = MODELS[args.model]
    world = dist.get_world_size()
    dp = world // args.pp
    if args.pp > 1 and world != args.pp:
        raise SystemExit(f"--pp {args.pp} runs on {args.pp} ranks (pure pipeline), not {world}")
    if args.rows % dp:
        raise SystemExit(f"--rows {args.rows} does not split over {dp} data-parallel ranks")
    local = make_rows(cfg["vocab_size"], args.rows, args.seq)
    local = local[dist.get_rank() * args.rows // dp:(dist.get_rank() + 1) * args.rows // dp] if args.pp == 1 else local
    microbatches = [collate(mb, 0, device) for mb in split_microbatches(local, microbatch_rows(args))]
    flops = model_flops(cfg, args.rows, args.seq)
    result = {"model": args.model, "config": cfg, "seq": args.seq, "rows": args.rows, "micro": args.micro,
              "ac": args.ac, "dtype": args.dtype, "ranks": world, "pp": args.pp, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "variants": {}}
    for name in args.variants.split(","):
        if args.pp > 1 and name.startswith("plain"):
            raise SystemExit(f"variant {name}: the plain loop is data parallel only; drop it under --pp")
        builder = {"ours": ours, "plain": plain}[name.removesuffix("_compile")]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.reset_accumulated_memory_stats()
        try:
            t_build = time.perf_counter()
            step = builder(args, cfg, device, microbatches, compile=name.endswith("_compile"))
            times, losses = timed(step, device, args.warmup, args.steps)
            t = statistics.median(times)
            row = {"step_s": round(t, 4), "tokens_per_s": round(args.rows * args.seq / t),
                   "tokens_per_s_per_gpu": round(args.rows * args.seq / t / world),
                   "mfu": round(flops / t / PEAK_FLOPS / world, 4), "steps_s": [round(x, 4) for x in times],
                   "losses": [round(x, 5) for x in losses], "build_and_warmup_s": round(time.perf_counter() - t_build - sum(times), 1)}
            if device.type == "cuda":
                free, total = torch.cuda.mem_get_info()
                stats = torch.cuda.memory_stats()  # the allocator's own count of driver calls since the variant began
                row["allocator"] = {k: stats.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
                row.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                           peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                           gpu_total_gib=round(total / 2**30, 2))
                if args.profile:
                    row["profile"] = kernel_profile(step, device)
                    if args.pp > 1:  # each stage's own GPU time
                        print(json.dumps({"rank": dist.get_rank(), name: row["profile"]["by_family_ms"]}), flush=True)
                if args.host_profile:
                    row["host_profile_ms"] = host_profile(step)
                if args.memory_trace:
                    from memory_trace import memory_trace

                    Path(args.memory_trace).mkdir(parents=True, exist_ok=True)
                    row["memory_trace"] = memory_trace(step, f"{args.memory_trace}/{name}.pickle.gz")
                if args.gaps:
                    row["gaps_profile"] = gpu_gaps(step)
                    gaps = row["gaps_profile"]  # per rank: pipeline stages idle differently
                    print(json.dumps({"rank": dist.get_rank(), name: {k: v for k, v in gaps.items() if k != "largest"},
                                      "largest": gaps["largest"][:3]}), flush=True)
        except torch.OutOfMemoryError as e:
            row = {"error": f"OOM: {str(e).splitlines()[0]}"}
        result["variants"][name] = row
        if dist.get_rank() == 0:
            print(json.dumps({name: {k: v for k, v in row.items() if "profile" not in k}}), flush=True)
        step = None
        gc.collect()
    if dist.get_rank() == 0 and args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
