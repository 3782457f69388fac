"""MoE training throughput: expert parallelism (ep2) beside FSDP-sharded experts (dp2), same 2 ranks, one run.

  torchrun --standalone --nproc_per_node=2 bench/moe_throughput.py --out moe.json [--profile]    # 2 x H200
  torchrun --standalone --nproc_per_node=2 bench/moe_throughput.py --model tiny --steps 2 --warmup 1   # CPU, gloo

Both layouts train the same random-init Qwen3-MoE (seed 0, built on the device: identical weights on every rank
and layout) through this project's trainer (models/build.py + Policy.sft_train_step, as bench/sft_throughput.py's
`ours`): bf16 compute, fp32 master weights, AdamW, clip 1.0, the sequence-wise balance loss (docs/moe.md), on the
same global batch of --rows identical rows of --seq tokens, split over the 2 data ranks, --micro rows per
forward/backward per rank:
- ep2: parallel.ep=2 (dense part dp2, experts split: 32 per rank; nemo's MoE parallelizer, edp=1);
- dp2: parallel.ep=1 (every layer, experts included, FSDP2-sharded over dp2; nemo's default parallelizer).
Reported per layout (one JSON line each, --out writes all): median step time over --steps after --warmup, tokens/s
(global and per GPU), MFU, peak allocated/reserved memory per GPU (after the build), every step's loss and
router metrics (moe_aux_loss, moe_load_imbalance, moe_idle_experts). Both layouts start from the same weights and
rows, so their first-step losses agree to bf16 noise (`first_loss_rel_diff`).

Backends (what runs, CUDA and CPU alike; nothing of Transformer Engine, DeepEP or the grouped_gemm package):
- experts: nemo `GroupedExperts` with `--experts torch_mm` (default, the project's backend: models/moe.py
  backend()): torch._grouped_mm over tokens sorted by expert (CUTLASS grouped GEMM on H100/H200); `--experts
  torch`: nemo's per-expert loop (a host sync per expert; the project's backend before 2026-12-01), swapped in
  before building, nothing else changes. The JSON says which ran (`experts`).
- dispatcher: nemo's "torch" one (all-gather of the ep group's tokens, local experts, all-reduce, narrow).
- attention: transformers' SDPA (causal, no mask: flash kernel on CUDA).
- weighted SwiGLU: nemo's torch.compile'd function on CUDA (triton), the same math eagerly on CPU.

Model (--model 3b): hidden 2048, 16 layers, 64 experts top-8 of width 768, 32 heads / 4 KV heads of 128, vocab 32000,
untied: 5.27 B parameters, 1.04 B active per token (0.97 B without the input embedding; `params` in the JSON counts
the built model). MFU = (6 N_active tokens + 6 layers heads*head_dim rows seq^2) / time / (2 x 989 TFLOP/s),
N_active without the input embedding.

Memory (both layouts hold the same 5.27 B parameters over 2 GPUs): fp32 weights + grads + 2 AdamW states =
16 B x 5.27 B / 2 = 42 GB per GPU. Activations, no checkpointing, 2 rows x 4096 = 8192 tokens per forward: per token
and layer ~34 KB for attention (bf16 norm/q/k/v/out) + ~102 KB for experts (8 routed copies of the 2048-wide input,
the 1536-wide gate/up output and the 768-wide activation, bf16) + ~16 KB fp32 combine: ~150 KB x 8192 x 16 = 20 GB;
logits 8192 x 32000 fp32 ~1 GB; ep2 also keeps the gathered tokens of both ranks (+~3 GB). Gradients reduce on the
last microbatch only (2 per rank here), so FSDP holds unsharded fp32 gradients of what it shards until then: dp2
+21 GB (every parameter), ep2 +~1 GB (the dense part; its experts are not FSDP-sharded, edp=1). dp2 ~85 GB, ep2
~65 GB of 141 GB: --micro 2 fits both without activation checkpointing.

Where the time should go (per rank and step, 2 microbatches): dp2 all-gathers every layer's bf16 weights in forward
and again in backward (its dense parallelizer reshards after forward; nemo's MoE parallelizer under ep2 does not,
`layer_reshard_after_forward` in the JSON) = 4 x 5.3 GB received, plus one fp32 reduce-scatter (~10.5 GB sent),
mostly overlapped with compute by FSDP's prefetch. ep2 moves tokens, not weights: per MoE layer and microbatch an
all-gather of the hidden states (34 MB), an fp32 all-reduce of every gathered token's partial output (134 MB) and
their backward twins, ~12 GB per step on the critical path (nemo's "torch" dispatcher all-reduces dense outputs
instead of an all-to-all of routed tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's automodel_mimo and bench.*

from bench.sft_throughput import PEAK_FLOPS, gpu_gaps, host_profile, kernel_profile, make_rows, timed  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512),
    "3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=64, num_experts_per_tok=8,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000),
}
COMMON = dict(norm_topk_prob=True, router_aux_loss_coef=0.001, tie_word_embeddings=False)
# name -> parallel.ep, both on 2 ranks (dp2 for the dense part); "dp1": one rank, no ep. A "_compile" suffix turns
# train.compile on (torch.compile per decoder layer, MoE block included), e.g. --layouts dp1,dp1_compile on one GPU
LAYOUTS = {"ep2": 2, "dp2": 1, "dp1": 1}
KERNEL_FAMILIES = (  # first match wins: grouped GEMMs before plain ones, NCCL before copies
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("expert grouped gemm", ("grouped", "groupproblem", "ptrarray")),
    ("all-to-all / nccl", ("nccl",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul")),
    ("optimizer", ("adam",)),
    ("copy/cast", ("copy", "memcpy", "memset")),
    ("compiled (triton)", ("triton",)),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
)


def param_counts(cfg: dict) -> dict:
    """Parameters of the Qwen3-MoE `cfg` (every layer sparse, untied embeddings): total, active per token, active
    without the input embedding (the N of 6 N tokens)."""
    h, layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    q, kv, d = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"], cfg["head_dim"]
    attention = h * q + 2 * h * kv + q * h + 2 * d  # q, k, v, o and the q/k RMSNorms
    expert = 3 * h * cfg["moe_intermediate_size"]
    e, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    dense = attention + h * e + 2 * h  # + router, 2 layer norms
    total = layers * (dense + e * expert) + h + 2 * h * v
    active = layers * (dense + k * expert) + h + 2 * h * v
    return {"total": total, "active": active, "active_no_embedding": active - h * v}


def model_flops(cfg: dict, n_active: int, rows: int, seq: int) -> float:
    """Training FLOPs of one step: 6 N_active per token + causal attention (QK^T and PV, forward + backward)."""
    width = cfg["num_attention_heads"] * cfg["head_dim"]
    return 6 * n_active * rows * seq + 6 * cfg["num_hidden_layers"] * width * rows * seq * seq


def measured_params(model: torch.nn.Module, cfg: dict) -> dict:
    """`param_counts` of the built (unsharded) model: total, and active with k of E experts per layer."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embedding = model.get_input_embeddings().weight.numel()
    active = total - experts + experts * cfg["num_experts_per_tok"] // cfg["num_experts"]
    return {"total": total, "active": active, "active_no_embedding": active - embedding}


def use_experts_backend(name: str) -> None:
    """The project builds nemo's GroupedExperts with experts="torch_mm" (models/moe.py: backend()); pick `name`."""
    from automodel_mimo.models import moe

    project = moe.backend
    moe.backend = lambda: dataclasses.replace(project(), experts=name)


def new_model(cfg: dict, seq: int, device: torch.device):
    """The Qwen3-MoE with nemo's MoE layers, built on `device` from seed 0 (the same weights on every rank)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_mimo.models.moe import build_moe_model

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", max_position_embeddings=seq, **COMMON, **cfg)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        return build_moe_model(model)


def build_policy(args, cfg: dict, ep: int, device: torch.device, params: dict, compile: bool = False):
    from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from automodel_mimo.config.checks import validate_experts
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.models.build import build_handle
    from policies.policy import Policy

    parallel = ParallelConfig(dp=dist.get_world_size(), ep=ep)
    validate_experts(parallel)
    run = RunConfig(parallel=parallel, model=ModelConfig(config={"model_type": "qwen3_moe", **cfg}, dtype=args.dtype),
                    train=TrainConfig(max_steps=1000, global_batch_size=args.rows, micro_batch_size=args.micro,
                                      lr=1e-5, warmup_steps=0, compile=compile))
    run.data.max_seq_len = args.seq
    state = build_parallel_state(run.parallel, device, run.model.dtype, compile=compile)
    model = new_model(cfg, args.seq, device)
    params.update(measured_params(model, cfg))
    return Policy(build_handle(run, model, state, pad_id=0), run.train)


def expert_layout(policy) -> dict:
    """How layer 0's experts run and are held: torch._grouped_mm or the loop, whether FSDP frees a decoder layer's
    gathered weights after forward (nemo's MoE parallelizer keeps them, its dense one frees them), the DTensor
    placements of gate_and_up_projs over which mesh axes, and this rank's shard."""
    experts = next(m for m in policy.handle.parts[0].modules() if hasattr(m, "gate_and_up_projs"))
    w = experts.gate_and_up_projs
    layer = next(m for m in policy.handle.parts[0].modules() if type(m).__name__.endswith("DecoderLayer"))
    layout = {"grouped_mm": experts.use_torch_mm, "global": list(w.shape)}
    if hasattr(layer, "_get_fsdp_state"):  # one rank: nemo leaves layers unsharded (plain tensors)
        group = layer._get_fsdp_state()._fsdp_param_group  # FSDP2: no post-forward mesh = kept gathered until backward
        layout["layer_reshard_after_forward"] = group.post_forward_mesh_info is not None
    if hasattr(w, "device_mesh"):
        layout.update(mesh=dict(zip(w.device_mesh.mesh_dim_names, w.device_mesh.shape)), placements=str(w.placements),
                      local=list(w.to_local().shape))
    return layout


def peak_memory_per_gpu() -> list[dict]:
    mine = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def run_layout(args, cfg: dict, ep: int, device, microbatches: list[dict], flops_of, compile: bool = False) -> dict:
    params: dict = {}
    # what an earlier layout left allocated (should be ~0: its policy is released before the next build)
    before = round(torch.cuda.memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    t_build = time.perf_counter()
    policy = build_policy(args, cfg, ep, device, params, compile)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t_build
    router: list[dict] = []

    def step() -> float:
        metrics = policy.sft_train_step(microbatches)
        router.append({k: round(float(v), 4) for k, v in metrics.items() if k.startswith("moe_")})
        return float(metrics["loss"])

    times, losses = timed(step, device, args.warmup, args.steps)
    t = statistics.median(times)
    tokens = args.rows * args.seq
    world = dist.get_world_size()
    row = {"ep": ep, "step_s": round(t, 4), "tokens_per_s": round(tokens / t), "tokens_per_s_per_gpu": round(tokens / t / world),
           "mfu": round(flops_of(params["active_no_embedding"]) / t / (PEAK_FLOPS * world), 4),
           "steps_s": [round(x, 4) for x in times], "losses": [round(x, 5) for x in losses], "router": list(router),
           "params": params, "expert_weights": expert_layout(policy), "build_s": round(build_s, 1)}
    if device.type == "cuda":
        row["memory_per_gpu"] = peak_memory_per_gpu()
        row["allocated_before_build_gib"] = before
        if args.profile:  # every rank runs the step (collectives); rank 0's kernels are reported
            row["profile"] = kernel_profile(step, device, families=KERNEL_FAMILIES)
        if args.gaps:  # where the GPU idles, with the host ops then, and the host's busiest ops
            row["gaps_profile"], row["host_profile_ms"] = gpu_gaps(step), host_profile(step)
    policy = None
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="3b")
    ap.add_argument("--layouts", default="ep2,dp2")
    ap.add_argument("--experts", choices=("torch_mm", "torch"), default="torch_mm",
                    help="nemo GroupedExperts backend: torch._grouped_mm, or the per-expert loop")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per row")
    ap.add_argument("--rows", type=int, default=8, help="rows per optimizer step (global)")
    ap.add_argument("--micro", type=int, default=2, help="rows per forward/backward per data rank")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--profile", action="store_true", help="CUDA: GPU time of one step by kernel family")
    ap.add_argument("--gaps", action="store_true", help="CUDA: where the GPU idles in one step, and the host's top ops")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from automodel_mimo.data.batching import collate, local_slice, split_microbatches
    from automodel_mimo.distributed.mesh import init_distributed
    from automodel_mimo.run.quiet import quiet_third_party

    quiet_third_party()
    device = init_distributed("auto")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.rows % (world * args.micro):
        ap.error(f"--rows={args.rows} must be a multiple of ranks x --micro = {world} x {args.micro}")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu":
        args.seq = min(args.seq, 128)
    use_experts_backend(args.experts)
    cfg = MODELS[args.model]
    rows = local_slice(make_rows(cfg["vocab_size"], args.rows, args.seq), rank, world)
    microbatches = [collate(mb, 0, device) for mb in split_microbatches(rows, args.micro)]
    result = {"model": args.model, "config": cfg, "params_formula": param_counts(cfg), "seq": args.seq, "rows": args.rows,
              "micro": args.micro, "world": world, "dtype": args.dtype, "experts": args.experts,
              "dispatcher": "torch (all-gather, all-reduce)", "attention": "sdpa",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "layouts": {}}
    for name in args.layouts.split(","):
        try:
            if name.removesuffix("_compile") not in LAYOUTS:
                ap.error(f"--layouts: unknown layout {name!r} (known: {sorted(LAYOUTS)}, each optionally _compile)")
            row = run_layout(args, cfg, LAYOUTS[name.removesuffix("_compile")], device, microbatches,
                             lambda n: model_flops(cfg, n, args.rows, args.seq), compile=name.endswith("_compile"))
        except torch.OutOfMemoryError as e:
            row = {"error": f"OOM: {str(e).splitlines()[0]}"}
        result["layouts"][name] = row
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps({name: {k: v for k, v in row.items() if "profile" not in k}}), flush=True)
    firsts = [r["losses"][0] for r in result["layouts"].values() if "losses" in r]
    if len(firsts) == 2:
        result["first_loss_rel_diff"] = abs(firsts[0] - firsts[1]) / abs(firsts[1])
    if rank == 0:
        print(json.dumps({"first_losses": firsts, "first_loss_rel_diff": result.get("first_loss_rel_diff")}), flush=True)
        for name, row in result["layouts"].items():
            if "profile" in row:
                print(json.dumps({f"{name}_profile_ms": row["profile"]["by_family_ms"]}), flush=True)
            if "gaps_profile" in row:
                gaps = row["gaps_profile"]
                print(json.dumps({f"{name}_gaps": {k: v for k, v in gaps.items() if k != "largest"},
                                  "largest": gaps["largest"][:4], "host_top": row["host_profile_ms"][:12]}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
