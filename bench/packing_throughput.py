"""Real (non-padding) tokens/s of SFT steps, packed vs padded, on a realistic length mix.

  torchrun --nproc_per_node=1 bench/packing_throughput.py [--tiny]

A ~1.1B Llama-style model (random init, bf16 compute, fp32 master weights) trains on sequences whose
lengths are log-normal (median ~600 tokens, capped at --max-len 4096). Each step sees the same
--batch sequences both ways:
- padded: microbatches of --micro sequences, each padded to its longest sequence (the library's
  collate), one forward/backward per microbatch;
- packed: the same sequences first-fit-decreasing packed into rows of --max-len tokens, --micro-rows
  rows per microbatch.
The padding-ratio limit is padded tokens / real tokens of the padded path: packing cannot beat it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
import torch.distributed as dist


def _lengths(n: int, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    mu, sigma = torch.log(torch.tensor(600.0)), 0.8
    raw = torch.exp(mu + sigma * torch.randn(n, generator=g))
    return [int(min(max_len, max(16, x))) for x in raw.tolist()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--micro", type=int, default=4, help="sequences per padded microbatch")
    ap.add_argument("--micro-rows", default="1", help="packed rows per microbatch; a comma list compares several")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="train.compile (default: on CUDA, as the CLI)")
    ap.add_argument("--profile", action="store_true",
                    help="per variant, GPU time by kernel family and the host ops of one step (bench/sft_throughput.py's)")
    ap.add_argument("--out")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_mimo.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from automodel_mimo.data.batching import collate, split_microbatches, split_rows
    from automodel_mimo.data.packing import collate_packed, pack
    from automodel_mimo.distributed.mesh import build_parallel_state, init_distributed
    from automodel_mimo.models import packed_attention
    from automodel_mimo.models.build import build_handle
    from automodel_mimo.run.quiet import quiet_third_party
    from policies.policy import Policy

    quiet_third_party()
    device = init_distributed("auto")
    if args.tiny:
        kwargs = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=args.max_len)
    else:
        kwargs = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                      max_position_embeddings=args.max_len, tie_word_embeddings=False)
    lengths = _lengths(args.batch, args.max_len, seed=0)
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(1, kwargs["vocab_size"], (n,), generator=g)
        rows.append({"input_ids": ids.tolist(), "labels": ids[1:].tolist() + [-100]})
    plan = pack(lengths, args.max_len)
    variants = {"padded": ("sdpa", [collate(mb, 0, device) for mb in split_microbatches(rows, args.micro)])}
    for micro_rows in map(int, args.micro_rows.split(",")):
        n_rows = -(-len(plan) // micro_rows) * micro_rows
        packed = collate_packed(rows, plan, args.max_len, 1, 0, n_rows=n_rows, device=device)
        name = "packed" if micro_rows == 1 else f"packed_{micro_rows}rows"
        variants[name] = (packed_attention.NAME, [split_rows(packed, i, i + micro_rows) for i in range(0, n_rows, micro_rows)])
    real = sum(lengths)
    padded_tokens = sum(mb["input_ids"].numel() for mb in variants["padded"][1])
    compile = device.type == "cuda" if args.compile is None else args.compile
    result = {"compile": compile, "real_tokens_per_step": real, "padding_ratio_limit": padded_tokens / real,
              "packed_rows": len(plan), "packed_fill": real / (len(plan) * args.max_len)}
    for name, (attn, microbatches) in variants.items():
        cfg = RunConfig(parallel=ParallelConfig(dp=1), model=ModelConfig(config=kwargs, dtype="float32" if args.tiny else "bfloat16"),
                        data=DataConfig(max_seq_len=args.max_len),
                        train=TrainConfig(max_steps=100, global_batch_size=args.batch, micro_batch_size=args.micro,
                                          lr=1e-5, warmup_steps=0))
        state = build_parallel_state(cfg.parallel, device, cfg.model.dtype, compile=compile)
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**kwargs), dtype=torch.float32,
                                                     attn_implementation=attn)
        model.config.use_cache = False
        policy = Policy(build_handle(cfg, model, state, pad_id=0), cfg.train)
        times = []
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            policy.sft_train_step(microbatches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        result[f"{name}_step_s"] = statistics.median(times)
        if args.profile and device.type == "cuda":
            from bench.sft_throughput import host_profile, kernel_profile

            step = functools.partial(policy.sft_train_step, microbatches)
            result[f"{name}_profile"], result[f"{name}_host_ops"] = kernel_profile(step, device), host_profile(step)
        result[f"{name}_real_tokens_per_s"] = real / result[f"{name}_step_s"]
        del policy, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name in variants:
        if name != "padded":
            result[f"{name}_speedup"] = result[f"{name}_real_tokens_per_s"] / result["padded_real_tokens_per_s"]
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=1))
        if args.out:
            json.dump(result, open(args.out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
