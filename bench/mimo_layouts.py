"""MIMO layouts benchmark: samples/s of a heterogeneous layout against homogeneous ones, in one run.

A vision-heavy MIMO model, random init from configs (no downloads): a ~300M SigLIP-like tower at 1024
patches per image (448 / 14) + MLP projector, and a ~1B Llama; bf16 compute, fp32 master weights, AdamW.
Every layout trains the same global batch (rows of `--images-per-row` images and `--text-tokens` text tokens
each) on the same ranks; for each layout in turn: build, warm up, time the median of a few steps, free the
memory. A layout the global batch cannot feed (e.g. LLM dp4 for 2 rows) is reported as infeasible, with the
reason. Prints per layout its step time, samples/s and the first and last step's loss (same init, same rows:
the losses agree across layouts up to bf16 noise; `first_loss_spread` in the summary), then one JSON object:
samples/s per layout and the speedup of the best heterogeneous layout over the best feasible homogeneous one.
Layouts per world size (LAYOUTS, NONCOLOCATED): 4 ranks, 2, or 1 (one GPU: the encoder-only and compile
measurements). `--layouts all` runs every layout family of the world size in one run: homogeneous, colocated
heterogeneous and non-colocated (the summary's `speedup_heterogeneous_any_over_best_homo`). A language pp layout
pipelines the LLM (1F1B) in pipeline microbatches of `--pp-microbatch-rows` rows; a language cp layout runs the
LLM in its packed attention. `--compile both` times each layout eager, then with train.compile.

  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py            # 4 GPUs (NCCL): 32 rows x 1 image
  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py --layouts all   # + pp2/cp2 and non-colocated
  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py --rows 2 --images-per-row 8  # fewer rows than GPUs
  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py --tiny     # CPU smoke test (gloo)
  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py --llm 8b   # a Llama-3-8B-shaped LLM instead
  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py --rows 2 --images-per-row 8 --encoder-only
      # the vision module alone per layout: wall, host and kernel time (--compile both: eager and compiled)
  torchrun --standalone --nproc_per_node=4 bench/mimo_layouts.py --noncolocated   # encoder and LLM on disjoint
      # GPUs (mimo.layout.<module>.offset) against two colocated layouts; speedup of the best non-colocated one,
      # and per non-colocated layout the share of the step its encoder / LLM ranks wait for each other
  bash bench/mimo_layouts_matrix.sh OUT [REGIME ...]   # the 4-GPU matrix: three regimes x both LLMs, --layouts all

2 GPUs: vision dp2 + language pp2 or tp2 against both dp2 and both tp2; the encoder on one GPU + the LLM on the
other against vision dp2 + language pp2 and both dp2; vision-heavy (1024 image + 128 text tokens per row) and
text-heavy (1024 + 2048):
  torchrun --standalone --nproc_per_node=2 bench/mimo_layouts.py --warmup 2 --steps 4                     # vision-heavy
  torchrun --standalone --nproc_per_node=2 bench/mimo_layouts.py --warmup 2 --steps 4 --noncolocated
  torchrun --standalone --nproc_per_node=2 bench/mimo_layouts.py --warmup 1 --steps 3 --text-tokens 2048  # text-heavy
  torchrun --standalone --nproc_per_node=2 bench/mimo_layouts.py --warmup 1 --steps 3 --text-tokens 2048 --noncolocated
  torchrun --standalone --nproc_per_node=2 bench/mimo_layouts.py --tiny [--noncolocated]   # CPU smoke test (gloo)

1 GPU: eager against compiled, the vision module alone and whole steps:
  torchrun --standalone --nproc_per_node=1 bench/mimo_layouts.py --rows 2 --images-per-row 8 --encoder-only --compile both
  torchrun --standalone --nproc_per_node=1 bench/mimo_layouts.py --compile both
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

from automodel_mimo.config import TrainConfig
from automodel_mimo.data.batching import local_slice
from automodel_mimo.data.microbatches import MicrobatchBuilder
from automodel_mimo.distributed.mesh import init_distributed
from automodel_mimo.errors import UserInputError
from automodel_mimo.mimo.handle import MimoHandle
from automodel_mimo.mimo.modules import build_vision_module
from automodel_mimo.models import packed_attention
from automodel_mimo.run.quiet import quiet_third_party
from policies.policy import Policy

# world size -> name -> (heterogeneous?, layout); every module spans all ranks
LAYOUTS = {
    1: {"single": (False, {"vision": {}, "language": {}})},  # one GPU: --encoder-only / --compile measurements
    4: {
        "hetero_vision_dp4_language_tp2dp2": (True, {"vision": {"dp": 4}, "language": {"dp": 2, "tp": 2}}),
        "hetero_vision_dp4_language_tp4": (True, {"vision": {"dp": 4}, "language": {"tp": 4}}),
        "hetero_vision_dp4_language_pp2dp2": (True, {"vision": {"dp": 4}, "language": {"pp": 2, "dp": 2}}),
        "hetero_vision_dp4_language_cp2dp2": (True, {"vision": {"dp": 4}, "language": {"cp": 2, "dp": 2}}),
        "homo_dp4": (False, {"vision": {"dp": 4}, "language": {"dp": 4}}),
        "homo_tp2dp2": (False, {"vision": {"dp": 2, "tp": 2}, "language": {"dp": 2, "tp": 2}}),
        "homo_tp4": (False, {"vision": {"tp": 4}, "language": {"tp": 4}}),
        # no homogeneous pp2 x dp2: encoders are not pipelined (mimo.layout.<encoder>.pp > 1 is refused)
    },
    2: {  # language pp2: 1F1B stages (mimo/pipeline.py), pipeline microbatches of --pp-microbatch-rows rows
        "hetero_vision_dp2_language_pp2": (True, {"vision": {"dp": 2}, "language": {"pp": 2}}),
        "hetero_vision_dp2_language_tp2": (True, {"vision": {"dp": 2}, "language": {"tp": 2}}),
        "homo_dp2": (False, {"vision": {"dp": 2}, "language": {"dp": 2}}),
        "homo_tp2": (False, {"vision": {"tp": 2}, "language": {"tp": 2}}),
    },
}
# --noncolocated: the encoder (+ projector) and the LLM on disjoint ranks, rows and gradients point-to-point
NONCOLOCATED = {
    4: {
        "noncoloc_vision_dp2_language_tp2": {"vision": {"dp": 2}, "language": {"tp": 2, "offset": 2}},
        "noncoloc_vision_dp2_language_dp2": {"vision": {"dp": 2}, "language": {"dp": 2, "offset": 2}},
        "noncoloc_vision_dp3_language_dp1": {"vision": {"dp": 3}, "language": {"offset": 3}},
        # the LLM on 3 GPUs: its heads, rows and layers do not split by 3 evenly; its layers do unevenly
        "noncoloc_vision_dp1_language_pp3": {"vision": {"dp": 1}, "language": {"pp": 3, "offset": 1}},
    },
    2: {"noncoloc_vision_dp1_language_dp1": {"vision": {"dp": 1}, "language": {"offset": 1}}},
    1: {},
}
NONCOLOCATED_BASELINES = {4: ("hetero_vision_dp4_language_tp2dp2", "homo_tp2dp2"),
                          2: ("hetero_vision_dp2_language_pp2", "homo_dp2")}
FULL = {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=448, patch_size=14),
        "llm": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000),
        "text_tokens": 128, "global_batch": 32, "llm_rows_per_microbatch": 4, "dtype": "bfloat16"}
LLM_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, vocab_size=32000)
MAX_POSITIONS = 32768  # the LLM's max_position_embeddings: covers text-heavy rows (1024 + 2048 tokens)
TINY = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=16, patch_size=4),
        "llm": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=300),
        "text_tokens": 16, "global_batch": 16, "llm_rows_per_microbatch": 4, "dtype": "float32"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU/gloo (a smoke test of the benchmark)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout (the median is reported)")
    names = {n: ", ".join([*LAYOUTS[n], *NONCOLOCATED[n]]) for n in LAYOUTS}
    p.add_argument("--layouts", help="comma-separated subset of the world size's layouts ("
                   + "; ".join(f"{n} ranks: {v}" for n, v in names.items())
                   + "); 'all': every one of them; default: its colocated ones; with --noncolocated its non-colocated ones and its baselines ("
                   + "; ".join(f"{n} ranks: {', '.join(v)}" for n, v in NONCOLOCATED_BASELINES.items()) + ")")
    p.add_argument("--noncolocated", action="store_true",
                   help="time non-colocated layouts (encoder and LLM on disjoint ranks) against colocated baselines")
    p.add_argument("--llm", choices=["1b", "8b"], default="1b", help="LLM of the GPU config (~1.2B or 8B Llama)")
    p.add_argument("--rows", type=int, help="global batch in rows (default: 32; --tiny 16)")
    p.add_argument("--images-per-row", type=int, default=1)
    p.add_argument("--text-tokens", type=int,
                   help="text tokens per row after its images (default 128; --tiny 16); text-heavy: 2048")
    p.add_argument("--pp-microbatch-rows", type=int, default=1,
                   help="rows of one pipeline microbatch of a language pp layout (its 1F1B schedule)")
    p.add_argument("--llm-rows-per-microbatch", type=int, help="at most this many rows per LLM microbatch (default 4)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off",
                   help="train.compile (every encoder and LLM layer compiled); both: each layout eager, then compiled")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="parallel.activation_checkpointing: every layer of both modules recomputed in backward")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="profile one more step (pass) per layout: the N host ops of most self CPU time, host op count, "
                        "compiled graphs and graph breaks")
    p.add_argument("--encoder-only", action="store_true",
                   help="time the vision module alone (forward + backward) per layout instead of training steps")
    return p.parse_args()


def base_modules(spec: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The vision module and the LLM on CPU, identical on every rank; each layout parallelizes a deep copy."""
    llm = AutoModelForCausalLM.from_config(LlamaConfig(**spec["llm"], max_position_embeddings=MAX_POSITIONS,
                                                       tie_word_embeddings=False, pad_token_id=0),
                                           dtype=torch.float32, attn_implementation="sdpa")
    llm.config.use_cache = False
    vision = build_vision_module({"model_type": "siglip_vision_model", "vision_use_head": False, **spec["vision"]},
                                 llm.config, seed=0)
    return vision, llm


def global_rows(spec: dict, tokens_per_image: int, placeholder: int) -> list[dict]:
    """The global batch's rows, identical on every rank and for every layout (seeded): `global_batch` rows of
    `images_per_row` images + text each, loss on the text."""
    g = torch.Generator().manual_seed(0)
    text, images, size = spec["text_tokens"], spec["images_per_row"], spec["vision"]["image_size"]
    rows = []
    for _ in range(spec["global_batch"]):
        ids = torch.randint(1, placeholder, (images * tokens_per_image + text,), generator=g)
        ids[1:1 + images * tokens_per_image] = placeholder
        labels = ids.clone()
        labels[:1 + images * tokens_per_image] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(),
                     "pixel_values": torch.randn(images, 3, size, size, generator=g)})
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def encoder_times(model: MimoHandle, spec: dict, device: torch.device, args) -> dict:
    """The vision module alone (encoder + projector, forward and backward of a mean-square loss) on this rank's
    share of the global batch's images (all images / encoder dp: the same FLOPs per GPU in every layout).
    Median wall time; median time until Python returns (close to the wall time: bound by the host, not the
    GPU); on CUDA the profiled kernel time of one more pass, without and with NCCL's kernels (which also
    count time spent waiting for other ranks)."""
    vision = model.modules[model.encoder_name]
    size = spec["vision"]["image_size"]
    images = spec["global_batch"] * spec["images_per_row"] // model.grids[model.encoder_name].size("dp")
    pixels = torch.randn(images, 3, size, size, device=device)

    def one_pass() -> float:
        vision(pixels).float().square().mean().backward()
        return time.perf_counter()

    walls, returns = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        t_return = one_pass()
        sync(device)
        if i >= args.warmup:
            walls.append(time.perf_counter() - t0)
            returns.append(t_return - t0)
    return {"images_per_dp_rank": images, "encoder_s": round(statistics.median(walls), 4),
            "python_returns_s": round(statistics.median(returns), 4), **profiled(one_pass, device, args.host_profile)}


def profiled(one_pass, device: torch.device, host_top: int) -> dict:
    """One more pass under the profiler: its wall time; on CUDA its kernel time, without and with NCCL's kernels
    (which also count time spent waiting for other ranks); with `host_top`, the host ops of most self CPU time (ms, inflated
    alike by the profiler) and torch.compile's graph count and graph breaks since the layout was built."""
    from torch._dynamo.utils import counters
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    activities = ([ProfilerActivity.CUDA] if device.type == "cuda" else []) + ([ProfilerActivity.CPU] if host_top else [])
    if not activities:
        return {}
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        one_pass()
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    out = {"profiled_wall_s": round(wall, 4)}  # kernel_s / profiled_wall_s: the GPU's busy share (both profiled)
    if device.type == "cuda":  # the kernels' own events (a host op's device time counts its kernels again)
        kernel_events = [e for e in events if e.device_type == DeviceType.CUDA]
        kernels = sum(e.self_device_time_total for e in kernel_events) / 1e6
        nccl = sum(e.self_device_time_total for e in kernel_events if "nccl" in e.key.lower()) / 1e6
        out.update(kernel_s=round(kernels, 4), non_nccl_kernel_s=round(kernels - nccl, 4))
    if host_top:
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:host_top]
        out.update(host_top_ms={e.key[:60]: round(e.self_cpu_time_total / 1e3, 1) for e in top},
                   host_ops=sum(e.count for e in events if e.device_type == DeviceType.CPU),
                   compiled_graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    return out


def idle_fractions(model: MimoHandle, idle: float) -> dict:
    """Non-colocated: the mean share of the step each module's ranks spent waiting in the cross-module
    exchanges (mimo/cross_schedule.py: for rows or gradients to arrive, for the last sends to complete)."""
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (model.on_language, idle))
    mean = {side: statistics.mean(f for on_language, f in per_rank if on_language == side) for side in (False, True)}
    return {"encoder_idle_fraction": round(mean[False], 3), "llm_idle_fraction": round(mean[True], 3)}


def llm_microbatch_rows(layout: dict, spec: dict) -> tuple[int, int]:
    """(LLM rows of one microbatch, rows of one coarse-block microbatch). A coarse-block microbatch of m rows
    gives the LLM m rows (fan-in/equal) or m/scale (fan-out): keep the LLM's rows per microbatch the same
    across layouts (capped by the rows one LLM replica gets). From the layout alone: a pipelined LLM needs
    the coarse microbatch size when it is built."""
    llm_dp, vision_dp = layout["language"].get("dp", 1), layout["vision"].get("dp", 1)
    llm_rows = min(spec["llm_rows_per_microbatch"], spec["global_batch"] // llm_dp)
    return llm_rows, llm_rows * max(1, llm_dp // vision_dp)


def pipeline_settings(layout: dict, spec: dict, llm_rows: int, micro: int, args) -> dict | None:
    """The pipeline dict MimoHandle needs for a language pp layout (what mimo/build.py takes from parallel.*);
    raises UserInputError where the LLM's rows per microbatch do not fill every stage."""
    pp = layout["language"].get("pp", 1)
    if pp == 1:
        return None
    rows = args.pp_microbatch_rows
    if llm_rows % rows or llm_rows // rows < pp:
        raise UserInputError(f"{llm_rows} LLM rows per microbatch do not split into >= {pp} pipeline microbatches of "
                             f"{rows} rows (--pp-microbatch-rows, --llm-rows-per-microbatch)")
    return {"schedule": "1f1b", "pp_microbatch_size": rows, "layers_per_stage": layers_per_stage(spec["llm"]["num_hidden_layers"], pp),
            "seq_len": spec["images_per_row"] * spec["tokens_per_image"] + spec["text_tokens"], "micro_batch_size": micro}


def layers_per_stage(layers: int, pp: int) -> int | None:
    """None where the layers split evenly over pp; else the stage size that makes exactly pp stages (AutoPipeline
    splits ceil(layers / size) stages differing by at most one layer), e.g. 16 layers over pp3: 6 (6, 5, 5)."""
    if layers % pp == 0:
        return None
    size = -(-layers // pp)
    if -(-layers // size) != pp:
        raise UserInputError(f"{layers} LLM layers do not split into {pp} pipeline stages")
    return size


def run_layout(layout: dict, base: tuple, spec: dict, device: torch.device, args, compiled: bool) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()  # this layout's compiled graphs and graph breaks only (profiled)
    vision, llm = copy.deepcopy(base[0]), copy.deepcopy(base[1])
    if layout["language"].get("cp", 1) > 1:  # the LLM's cp runs in its packed attention (same weights, same math)
        llm.set_attn_implementation(packed_attention.NAME)
    placeholder = spec["llm"]["vocab_size"] - 1
    tokens_per_image = spec["tokens_per_image"]
    llm_rows, micro = llm_microbatch_rows(layout, spec)
    try:  # every rank validates the same layout against the same batch: all raise or none
        model = MimoHandle({"vision": vision}, llm, layout, device, placeholder, tokens_per_image,
                          dtype=spec["dtype"], global_batch_size=spec["global_batch"],
                          pipeline=pipeline_settings(layout, spec, llm_rows, micro, args), compile=compiled,
                          activation_checkpointing=args.activation_checkpointing)
    except UserInputError as e:
        return {"infeasible": str(e)}
    index, count = model.data_block()
    assert micro == llm_rows * model.rows_multiple(), (layout, micro, model.rows_multiple())
    policy = Policy(model, TrainConfig(max_steps=args.warmup + args.steps, global_batch_size=spec["global_batch"],
                                           micro_batch_size=micro, lr=1e-5))
    # the trainer's microbatches of this rank's block of rows (cp: each row one cp-shardable segment)
    builder = MicrobatchBuilder(0, device, cp=model.cp_size, pad_multiple=model.pad_multiple)
    batch = builder.build(local_slice(global_rows(spec, tokens_per_image, placeholder), index, count), micro)
    if args.encoder_only:
        out = encoder_times(model, spec, device, args)
    else:
        model.schedule_trace.sync_cuda = True  # non-colocated waits end when the GPU has the data
        times, waits = [], []
        for step in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            metrics = policy.sft_train_step(batch)
            sync(device)
            if step == 0:
                first_loss = metrics["loss"]
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
                waits.append(model.schedule_trace.seconds("wait"))
        step_s = statistics.median(times)
        out = {"step_s": round(step_s, 4), "samples_per_s": round(spec["global_batch"] / step_s, 3),
               "first_loss": round(first_loss, 7), "loss": round(metrics["loss"], 7),
               "microbatches_per_rank": len(batch), "microbatch_rows": micro}
        if not model.colocated:
            out.update(idle_fractions(model, sum(waits) / sum(times)))
        out.update(profiled(functools.partial(policy.sft_train_step, batch), device, args.host_profile))  # one more step
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    model.destroy()
    del model, policy, batch, vision, llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def main() -> None:
    args = parse_args()
    if args.noncolocated and args.encoder_only:
        raise SystemExit("--encoder-only times the encoder on every rank; non-colocated layouts hold it on some only")
    quiet_third_party()
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the vision output is a view: harmless here
    spec = dict(TINY if args.tiny else {**FULL, "llm": LLM_8B} if args.llm == "8b" else FULL)
    spec["images_per_row"] = args.images_per_row
    spec["text_tokens"] = args.text_tokens or spec["text_tokens"]
    spec["tokens_per_image"] = (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2
    spec["global_batch"] = args.rows or spec["global_batch"]
    spec["llm_rows_per_microbatch"] = args.llm_rows_per_microbatch or spec["llm_rows_per_microbatch"]
    device = init_distributed("gloo" if args.tiny else "auto")
    world = dist.get_world_size()
    if world not in LAYOUTS:
        raise SystemExit(f"bench/mimo_layouts.py runs on {', '.join(map(str, LAYOUTS))} ranks "
                         f"(torchrun --nproc_per_node=N), not {world}")
    layouts, noncolocated = LAYOUTS[world], NONCOLOCATED[world]
    if args.noncolocated and world not in NONCOLOCATED_BASELINES:
        raise SystemExit(f"--noncolocated needs 2 or 4 ranks (the encoder and the LLM on disjoint GPUs), not {world}")
    if args.layouts == "all":
        args.layouts = ",".join([*layouts, *noncolocated])
    args.layouts = args.layouts or ",".join([*noncolocated, *NONCOLOCATED_BASELINES[world]] if args.noncolocated
                                            else layouts)
    unknown = [n for n in args.layouts.split(",") if n not in layouts and n not in noncolocated]
    if unknown:
        raise SystemExit(f"--layouts {','.join(unknown)}: not a {world}-rank layout ({', '.join([*layouts, *noncolocated])})")
    seq_len = spec["images_per_row"] * spec["tokens_per_image"] + spec["text_tokens"]
    if seq_len > MAX_POSITIONS:
        raise SystemExit(f"rows of {seq_len} tokens exceed the LLM's max_position_embeddings={MAX_POSITIONS}")
    torch.manual_seed(0)
    base = base_modules(spec)
    params = {"vision": sum(p.numel() for p in base[0].parameters()), "llm": sum(p.numel() for p in base[1].parameters())}
    began = time.perf_counter()
    results = {}
    kinds = {}  # result name -> True (heterogeneous), False (homogeneous) or "noncolocated"
    for name in args.layouts.split(","):
        layout = noncolocated[name] if name in noncolocated else layouts[name][1]
        for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
            key = name + ("+compile" if compiled else "")
            results[key] = {**run_layout(layout, base, spec, device, args, compiled), "layout": layout}
            kinds[key] = "noncolocated" if name in noncolocated else layouts[name][0]
            if dist.get_rank() == 0:
                print(f"[mimo_layouts] {key}: {results[key]}", flush=True)
    feasible = {n: r for n, r in results.items() if "infeasible" not in r}
    best = {kind: max((r["samples_per_s"], n) for n, r in feasible.items() if kinds[n] == kind)
            for kind in {kinds[n] for n in feasible}} if not args.encoder_only else {}
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "ranks": dist.get_world_size(), "dtype": spec["dtype"], "parameters": params,
               "tokens_per_image": spec["tokens_per_image"], "text_tokens": spec["text_tokens"], "seq_len": seq_len,
               "global_batch": spec["global_batch"], "images_per_row": spec["images_per_row"], "results": results,
               "wall_s": round(time.perf_counter() - began, 1)}
    if not args.encoder_only and feasible:  # same init, same rows: every layout's first loss should agree
        firsts = [r["first_loss"] for r in feasible.values()]
        summary["first_loss_spread"] = max(firsts) - min(firsts)
    colocated = [best[k] for k in (True, False) if k in best]
    if "noncolocated" in best and colocated:
        summary.update(best_noncolocated=best["noncolocated"][1], best_colocated=max(colocated)[1],
                       speedup_noncolocated_over_best_colocated=round(best["noncolocated"][0] / max(colocated)[0], 3))
    if True in best and False in best:
        summary.update(best_hetero=best[True][1], best_homo=best[False][1],
                       speedup_hetero_over_best_homo=round(best[True][0] / best[False][0], 3))
    heterogeneous = [best[k] for k in (True, "noncolocated") if k in best]
    if heterogeneous and False in best:  # the target: heterogeneous, colocated or not, over homogeneous
        summary.update(best_heterogeneous_any=max(heterogeneous)[1],
                       speedup_heterogeneous_any_over_best_homo=round(max(heterogeneous)[0] / best[False][0], 3))
    if dist.get_rank() == 0:
        print(json.dumps(summary), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
