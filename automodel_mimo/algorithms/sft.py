"""Supervised fine-tuning: the SPMD loop every rank runs.

data (seed, step) -> global batch -> this DP rank's block -> microbatches -> policy train step
-> metrics / eval / checkpoint; at the end an HF export.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import datasets
import torch
import torch.distributed as dist

from automodel_mimo.algorithms.loop import SkipStreak, finish, open_logs, resume, run_steps
from automodel_mimo.checkpoint import export_hf
from automodel_mimo.config import RunConfig, TrainConfig, packed_row_size, pad_multiple
from automodel_mimo.data.batching import collate, global_batch_indices, local_slice, split_microbatches, split_rows
from automodel_mimo.data.packing import collate_packed, pack
from automodel_mimo.data.sources import load_sft_dataset
from automodel_mimo.data.synthetic import grade_exact
from automodel_mimo.data.tokenize import tokenize_dataset
from automodel_mimo.distributed.equal_steps import max_over_group
from automodel_mimo.distributed.mesh import build_parallel_state, init_distributed
from automodel_mimo.models.build import build_lm_handle
from automodel_mimo.models.tokenizer import load_tokenizer
from automodel_mimo.parallel.context_parallel import as_single_segments, shard_batch
from policies.lm_policy import LMPolicy


def prepare_sft_data(cfg: RunConfig, tokenizer) -> datasets.DatasetDict:
    """Load and tokenize; deterministic, so every rank computes (and rejects) the same rows. Tokenized in the
    files' row order, before the eval hold-out, so errors name the file's row (load_sft_dataset)."""
    d = cfg.data

    def tokenize(ds: datasets.Dataset, split: str) -> datasets.Dataset:
        return tokenize_dataset(ds, tokenizer, max_seq_len=d.max_seq_len, use_chat_template=d.chat_template,
                                truncate=d.truncate, split_name=split)

    return load_sft_dataset(
        d.dataset, seed=cfg.seed, prompt_key=d.prompt_key, response_key=d.response_key, messages_key=d.messages_key,
        train_split=d.train_split, eval_split=d.eval_split, eval_fraction=d.eval_fraction,
        num_train=d.num_train, num_eval=d.num_eval, digits=d.digits, name=d.name, prepare=tokenize)


def step_microbatches(cfg: RunConfig, train: datasets.Dataset, step: int, state, pad_id: int) -> list[dict]:
    """This DP rank's microbatches of the global batch of `step` (0-based): padded rows of
    train.micro_batch_size sequences, or (data.packing) packed rows, train.micro_batch_size rows each."""
    t = cfg.train
    indices = global_batch_indices(step, len(train), t.global_batch_size, cfg.seed)
    mine = train[local_slice(indices, state.dp_rank, cfg.dp)]
    rows = [{"input_ids": i, "labels": l} for i, l in zip(mine["input_ids"], mine["labels"])]
    if cfg.data.packing:
        microbatches = packed_microbatches(cfg, rows, state, pad_id)
    else:
        microbatches = [collate(mb, pad_id, state.device) for mb in split_microbatches(rows, t.micro_batch_size)]
        if cfg.parallel.cp > 1:
            microbatches = [as_single_segments(mb, cfg.parallel.cp, pad_id) for mb in microbatches]
    return [shard_batch(mb, cfg.parallel.cp, state.cp_rank) for mb in microbatches]  # no-op when cp == 1


def packed_microbatches(cfg: RunConfig, rows: list[dict], state, pad_id: int) -> list[dict]:
    """Pack this rank's sequences; every DP rank gets the same number of rows (weight-0 dummy rows)."""
    size, multiple = packed_row_size(cfg.data), pad_multiple(cfg.parallel)
    plan = pack([len(r["input_ids"]) for r in rows], size, multiple)
    micro = cfg.train.micro_batch_size
    n_rows = -(-max_over_group(len(plan), state.dp_cp_group, state.device) // micro) * micro
    batch = collate_packed(rows, plan, size, multiple, pad_id, n_rows=n_rows, device=state.device)
    return [split_rows(batch, i, i + micro) for i in range(0, n_rows, micro)]


WARMUP_CHECK_EVERY, WARMUP_CHECK_SAMPLES = 25, 200


def warmup_train_config(train: TrainConfig, steps: int, lr: float) -> TrainConfig:
    """The RL algorithms' SFT warm-up schedule: `steps` steps at a constant `lr` after a short warm-up."""
    return dataclasses.replace(train, lr=lr, min_lr=0.0, max_steps=steps, warmup_steps=min(20, steps),
                               lr_decay="constant")


def sft_warmup(tag: str, handle, state, train: TrainConfig, microbatches: Callable[[int], list[dict]],
               accuracy: Callable[[LMPolicy], float] | None = None, target: float = 0.0) -> None:
    """Up to train.max_steps SFT steps on `microbatches(step)` with an optimizer of their own (schedule:
    `warmup_train_config`): the starting policy of DPO and GRPO. With `target` > 0, `accuracy(policy)` (held-out
    greedy accuracy) is checked every WARMUP_CHECK_EVERY steps and the warm-up stops at the first check that
    reaches it: the start is then a level of skill, not a step count, which varies with the seed and the machine
    (the step at which a tiny model learns the task does). Deterministic."""
    warm = LMPolicy(handle, state, train)
    streak = SkipStreak(train.max_skipped_steps, what=f"{tag} sft warm-up step")
    for step in range(train.max_steps):
        metrics = warm.sft_train_step(microbatches(step))
        streak.update(step + 1, metrics)
        done = step + 1
        checked = target > 0 and accuracy is not None and done % WARMUP_CHECK_EVERY == 0
        reached = checked and (score := accuracy(warm)) >= target
        if state.is_rank0 and (done % 50 == 0 or reached):
            extra = f", held-out accuracy {score:.3f}" if checked else ""
            print(f"[{tag}] sft warm-up step {done}/{train.max_steps}: loss {metrics['loss']:.4f}{extra}", flush=True)
        if reached:
            if state.is_rank0:
                print(f"[{tag}] sft warm-up reached {target} held-out accuracy at step {done}", flush=True)
            return


def warmup_accuracy(cfg: RunConfig, eval_ds: datasets.Dataset, tokenizer) -> Callable[[LMPolicy], float]:
    """The warm-up's check: held-out greedy accuracy on (at most) the first WARMUP_CHECK_SAMPLES eval prompts."""
    n = min(WARMUP_CHECK_SAMPLES, cfg.eval.num_samples or WARMUP_CHECK_SAMPLES)
    check_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_samples=n))
    return lambda policy: evaluate_accuracy(check_cfg, policy, eval_ds, tokenizer)["eval/accuracy"]


def evaluate_accuracy(cfg: RunConfig, policy: LMPolicy, eval_ds: datasets.Dataset, tokenizer) -> dict:
    """Exact-match accuracy of greedy answers on the held-out split, prompts spread over DP ranks."""
    n = len(eval_ds) if cfg.eval.num_samples == 0 else min(cfg.eval.num_samples, len(eval_ds))
    per_rank = math.ceil(n / cfg.dp)
    start = min(n, policy.state.dp_rank * per_rank)
    mine = eval_ds.select(range(start, min(n, start + per_rank)))
    prompts, refs = mine["prompt_ids"], mine["reference"]
    stop_ids = set(tokenizer.all_special_ids)
    bs = cfg.eval.batch_size
    correct = 0
    for b in range(math.ceil(per_rank / bs)):  # same number of calls on every rank
        chunk = prompts[b * bs:(b + 1) * bs]
        outs = policy.greedy_generate(chunk, cfg.eval.max_new_tokens, stop_ids, tokenizer.pad_token_id)
        for out, ref in zip(outs, refs[b * bs:(b + 1) * bs]):
            correct += grade_exact(tokenizer.decode(out, skip_special_tokens=True), ref)
    # cp ranks evaluate the same prompts (generation is not sharded): count each prompt once
    total = policy.sum_over_data_ranks(torch.tensor(float(correct) if policy.state.cp_rank == 0 else 0.0))
    return {"eval/accuracy": float(total) / max(1, n), "eval/num_samples": n}


def run_sft(cfg: RunConfig) -> None:
    device = init_distributed(cfg.launch.dist_backend)
    state = build_parallel_state(cfg.parallel, device, cfg.model.dtype)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained)
    pad = tokenizer.pad_token_id
    data = prepare_sft_data(cfg, tokenizer)
    handle = build_lm_handle(cfg, tokenizer, state)
    policy = LMPolicy(handle, state, cfg.train)
    ckpt, start = resume(cfg, handle, policy.optimizer)
    n_params = _count_parameters(handle, device)
    if state.is_rank0:
        print(f"[sft] {dist.get_world_size()} ranks, {cfg.layout}, "
              f"{len(data['train'])} train / {len(data['eval'])} eval rows, {n_params:,} parameters, start step {start}",
              flush=True)
    logger = open_logs(cfg, start, cfg.layout)

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        metrics = policy.sft_train_step(step_microbatches(cfg, data["train"], i, state, pad))
        return {**metrics, "tokens_per_s": metrics["tokens"] / (time.perf_counter() - t0)}

    run_steps(cfg, start, logger, step, evaluate=lambda done: evaluate_accuracy(cfg, policy, data["eval"], tokenizer),
              save=lambda done: ckpt.save(done, handle, policy.optimizer))
    finish(cfg, logger, "sft", lambda folder: export_hf(handle, tokenizer, folder))


def _count_parameters(handle, device) -> int:
    """Whole-model count (DTensor numel is global; pipeline stages are summed)."""
    count = torch.tensor(float(sum(p.numel() for p in handle.parameters())), device=device)
    if handle.stage_group is not None:
        dist.all_reduce(count, group=handle.stage_group)
    return int(count)
