"""Pipeline overhead vs the ideal bubble: forward+backward time of an SFT step of a ~1B Llama-style model
(random init, bf16 compute) under pp1 (1 rank) and pp2 (2 ranks, 1F1B) at equal batch, for 2, 4 and 8
pipeline microbatches. The optimizer step is run but not timed: it is per-stage work that scales
perfectly with p and would hide the bubble.

  torchrun --nproc_per_node=1 bench/pp_bubble.py --pp 1 --out pp1.json
  torchrun --nproc_per_node=2 bench/pp_bubble.py --pp 2 --out pp2.json
  python bench/pp_bubble.py --report pp1.json pp2.json

Each step runs m rows (one row per pipeline microbatch) of `--seq` random tokens. With p stages the ideal
pp step time is t1 / p * (m + p - 1) / m, i.e. an overhead of (p - 1) / (m + p - 1) over perfect scaling;
the measured overhead is 1 - t1 / (p * tp). `--tiny` runs a small model on CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def _model_config(tiny: bool) -> dict:
    if tiny:
        return dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    # ~1.1B parameters
    return dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                tie_word_embeddings=False)


def _measure(pp: int, m: int, seq: int, tiny: bool, steps: int, warmup: int) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    from automodel_mimo.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from automodel_mimo.data.batching import collate
    from automodel_mimo.distributed.mesh import build_parallel_state
    from automodel_mimo.models.build import build_handle
    from policies.policy import Policy

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    kwargs = _model_config(tiny)
    cfg = RunConfig(
        parallel=ParallelConfig(dp=1, pp=pp, pp_microbatch_size=1),
        model=ModelConfig(config=kwargs, dtype="float32" if tiny else "bfloat16"),
        train=TrainConfig(max_steps=100, global_batch_size=m, micro_batch_size=m, lr=1e-4, warmup_steps=0))
    cfg.data.max_seq_len = seq
    state = build_parallel_state(cfg.parallel, device, cfg.model.dtype)
    hf_config = AutoConfig.for_model(**kwargs)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.config.use_cache = False
    policy = Policy(build_handle(cfg, model, state, pad_id=0), cfg.train)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(m):
        ids = torch.randint(1, kwargs["vocab_size"], (seq,), generator=g)
        rows.append({"input_ids": ids.tolist(), "labels": ids[1:].tolist() + [-100]})
    batch = [collate(rows, 0, device)]
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        policy.sft_forward_backward(batch)  # the pipelined part; the optimizer step is per-stage work
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        policy.optimizer_step()
    del policy, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def _report(paths: list[str]) -> None:
    """Two views of the same runs. (1) pp vs pp1: overhead over perfect scaling, 1 - t1 / (p * tp).
    (2) pp alone: the steady-state time s of one microbatch slot is the slope of t(m) between the two
    largest m; the measured bubble is 1 - m * s / t(m), to compare with (p - 1) / (m + p - 1)."""
    runs = {r["pp"]: r for r in (json.load(open(p)) for p in paths)}
    base, piped = runs[1], runs[max(runs)]
    p = piped["pp"]
    ms = sorted(piped["step_s"], key=int)
    t = {int(m): piped["step_s"][m] for m in ms}
    m_hi, m_lo = int(ms[-1]), int(ms[-2])
    slot = (t[m_hi] - t[m_lo]) / (m_hi - m_lo)
    print(f"| m | pp1 fwd+bwd (s) | pp{p} fwd+bwd (s) | 1 - t1/(p*t{p}) | measured bubble 1 - m*s/t | ideal (p-1)/(m+p-1) |")
    print("|---|---|---|---|---|---|")
    for m in ms:
        t1, tp = base["step_s"][m], piped["step_s"][m]
        mi = int(m)
        print(f"| {m} | {t1:.3f} | {tp:.3f} | {1 - t1 / (p * tp):.3f} | {1 - mi * slot / tp:.3f} | {(p - 1) / (mi + p - 1):.3f} |")
    print(f"steady-state slot s = {slot:.4f} s per microbatch (slope between m={m_lo} and m={m_hi})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--report", nargs="+")
    args = ap.parse_args()
    if args.report:
        return _report(args.report)
    from automodel_mimo.distributed.mesh import init_distributed
    from automodel_mimo.run.quiet import quiet_third_party

    quiet_third_party()
    init_distributed("auto")
    result = {"pp": args.pp, "seq": args.seq, "tiny": args.tiny, "step_s": {}}
    for m in args.microbatches:
        result["step_s"][m] = _measure(args.pp, m, args.seq, args.tiny, args.steps, args.warmup)
        if dist.get_rank() == 0:
            print(f"pp={args.pp} m={m}: median step {result['step_s'][m]:.4f} s", flush=True)
    if dist.get_rank() == 0 and args.out:
        json.dump(result, open(args.out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
