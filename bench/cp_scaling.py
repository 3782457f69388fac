"""Context parallelism on GPUs: one SFT step on a single long sequence, cp=1 vs cp=2.

  torchrun --nproc_per_node=<cp> bench/cp_scaling.py --seq-len 32768 [--tiny]
  bash bench/cp_scaling.sh            # the sweep: longest trainable length and tokens/s per GPU

The 1.1B Llama of the other benchmarks (bf16 compute, fp32 master weights and AdamW state; activation
checkpointing with --activation-checkpointing) trains on one sequence of --seq-len tokens, sharded over the cp ranks by the library's
dual-chunk layout, attention through the packed varlen path (K/V all-gathered over cp). Prints one JSON
line: step time, real tokens/s per GPU and peak memory, or {"oom": true} (exit 3) when it does not fit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one more step (rank 0)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="parallel.activation_checkpointing=true")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_mimo.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from automodel_mimo.data.packing import collate_packed, pack
    from automodel_mimo.distributed.mesh import build_parallel_state, init_distributed
    from automodel_mimo.models import packed_attention
    from automodel_mimo.models.build import build_handle
    from automodel_mimo.run.quiet import quiet_third_party
    from policies.policy import Policy

    quiet_third_party()
    device = init_distributed("auto")
    cp = dist.get_world_size()
    L = args.seq_len
    if args.tiny:
        kwargs = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=L)
    else:
        kwargs = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                      max_position_embeddings=L, tie_word_embeddings=False)
    cfg = RunConfig(parallel=ParallelConfig(dp=1, cp=cp, activation_checkpointing=args.activation_checkpointing),
                    model=ModelConfig(config=kwargs, dtype="float32" if args.tiny else "bfloat16"),
                    data=DataConfig(max_seq_len=L, packing=True),
                    train=TrainConfig(max_steps=100, global_batch_size=1, micro_batch_size=1, lr=1e-5, warmup_steps=0))
    state = build_parallel_state(cfg.parallel, device, cfg.model.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, kwargs["vocab_size"], (L,), generator=g)
    rows = [{"input_ids": ids.tolist(), "labels": ids[1:].tolist() + [-100]}]
    multiple = 2 * cp if cp > 1 else 1
    batch = collate_packed(rows, pack([L], L, multiple), L, multiple, 0, device=device)
    microbatches = [batch]  # whole rows: the handle shards them over cp
    result = {"seq_len": L, "cp": cp, "activation_checkpointing": args.activation_checkpointing, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    try:
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**kwargs), dtype=torch.float32,
                                                     attn_implementation=packed_attention.NAME)
        model.config.use_cache = False
        policy = Policy(build_handle(cfg, model, state, pad_id=0), cfg.train)
        times = []
        for i in range(1 + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            policy.sft_train_step(microbatches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        result["oom"] = True
        print(json.dumps(result), flush=True)
        return 3
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            policy.sft_train_step(microbatches)
            torch.cuda.synchronize()
        if dist.get_rank() == 0:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    step = statistics.median(times)
    result.update(step_s=round(step, 3), tokens_per_s_per_gpu=round(L / step / cp, 1),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
