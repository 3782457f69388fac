"""The RL algorithms' SFT warm-up: the starting policy of DPO and GRPO, trained by the command itself.

Up to train.max_steps SFT steps with an optimizer of their own (constant learning rate after a short ramp). With
a target accuracy, held-out greedy accuracy is checked every WARMUP_CHECK_EVERY steps and the warm-up stops at
the first check that reaches it: the start is then a level of skill, not a step count, which varies with the
seed and the machine (the step at which a tiny model learns a task does). Deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import datasets
import torch.distributed as dist

from automodel_mimo.algorithms.evaluate import evaluate_accuracy
from automodel_mimo.algorithms.loop import SkipStreak
from automodel_mimo.config import RunConfig, TrainConfig
from policies.policy import Policy

WARMUP_CHECK_EVERY, WARMUP_CHECK_SAMPLES = 25, 200


def warmup_train_config(train: TrainConfig, steps: int, lr: float) -> TrainConfig:
    """`steps` steps at a constant `lr` after a short ramp."""
    return dataclasses.replace(train, lr=lr, min_lr=0.0, max_steps=steps, warmup_steps=min(20, steps),
                               lr_decay="constant")


def warmup_accuracy(cfg: RunConfig, eval_ds: datasets.Dataset, tokenizer, processor=None,
                    banned: int | None = None) -> Callable[[Policy], float]:
    """The check: held-out greedy accuracy on (at most) the first WARMUP_CHECK_SAMPLES eval prompts (with their
    images through `processor`, `banned` never generated: a MIMO model)."""
    n = min(WARMUP_CHECK_SAMPLES, cfg.eval.num_samples or WARMUP_CHECK_SAMPLES)
    check_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_samples=n))
    return lambda policy: evaluate_accuracy(check_cfg, policy, eval_ds, tokenizer, processor, banned)["eval/accuracy"]


def sft_warmup(tag: str, handle, train: TrainConfig, microbatches: Callable[[int], list[dict]],
               accuracy: Callable[[Policy], float] | None = None, target: float = 0.0) -> None:
    """Up to train.max_steps SFT steps on `microbatches(step)`; with `target` > 0, until `accuracy` reaches it."""
    warm = Policy(handle, train)
    streak = SkipStreak(train.max_skipped_steps, what=f"{tag} sft warm-up step")
    rank0 = dist.get_rank() == 0
    for step in range(train.max_steps):
        metrics = warm.sft_train_step(microbatches(step))
        streak.update(step + 1, metrics)
        done = step + 1
        checked = target > 0 and accuracy is not None and done % WARMUP_CHECK_EVERY == 0
        reached = checked and (score := accuracy(warm)) >= target
        if rank0 and (done % 50 == 0 or reached):
            extra = f", held-out accuracy {score:.3f}" if checked else ""
            print(f"[{tag}] sft warm-up step {done}/{train.max_steps}: loss {metrics['loss']:.4f}{extra}", flush=True)
        if reached:
            if rank0:
                print(f"[{tag}] sft warm-up reached {target} held-out accuracy at step {done}", flush=True)
            return
