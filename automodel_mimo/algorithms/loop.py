"""What every run loop shares: resuming from the latest checkpoint, the step loop with its metrics rows,
periodic eval and checkpoints, and the end of a run (HF export, closing the logs, the last barrier).

The algorithms differ only in what one step and one eval do; those come in as functions.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from automodel_mimo.checkpoint import Checkpointer
from automodel_mimo.config import RunConfig
from automodel_mimo.errors import RunStopped, UserInputError
from automodel_mimo.run.faults import fault_point
from automodel_mimo.metrics import MetricsLogger
from automodel_mimo.run.record import record_run

SKIP_WARNING = "non-finite loss or grad_norm: step skipped, weights unchanged"


def resume(cfg: RunConfig, model, optimizer) -> tuple[Checkpointer, int]:
    """The run's checkpointer and its first step: after the checkpoint `resume_checkpoint` picks (model and
    optimizer loaded from it), else 0."""
    ckpt = Checkpointer(cfg.output_dir, cfg.checkpoint.keep_last)
    start = 0
    if (path := resume_checkpoint(cfg, ckpt)) is not None:
        start = ckpt.load(path, model, optimizer)
    return ckpt, start


def resume_checkpoint(cfg: RunConfig, ckpt: Checkpointer) -> Path | None:
    """Collective. With checkpoint.resume: the newest intact checkpoint (Checkpointer.latest_intact); when there
    is none, a note and None (start at step 0), or with checkpoint.resume_required a UserInputError."""
    if not cfg.checkpoint.resume:
        return None
    path = ckpt.latest_intact()
    if path is None:
        if cfg.checkpoint.resume_required:
            raise UserInputError(f"checkpoint.resume=true: {ckpt.root} holds no usable checkpoint, and "
                                 "checkpoint.resume_required=true; point output_dir at the run to continue, or set "
                                 "checkpoint.resume_required=false to start from step 0")
        if dist.get_rank() == 0:
            print(f"note: checkpoint.resume=true but {ckpt.root} holds no usable checkpoint: starting at step 0",
                  file=sys.stderr, flush=True)
    return path


def open_logs(cfg: RunConfig, start: int, layout: str) -> MetricsLogger:
    """Rank 0 records what runs (run_record: config.yaml, run_info.json; notes on a changed config at
    resume) and opens the metric sinks; the other ranks get a logger that writes nothing."""
    rank0 = dist.get_rank() == 0
    if rank0:
        for note in record_run(cfg, start, layout, dist.get_world_size()):
            print(f"note: {note}", flush=True)
    return MetricsLogger(cfg, start, enabled=rank0)


def due(every: int, done: int, last: int) -> bool:
    """An every-N-steps event (eval) at step `done`: on multiples of N and at the last step."""
    return every > 0 and (done % every == 0 or done == last)


class SkipStreak:
    """Steps skipped in a row for a non-finite loss or gradient norm (the optimizers decide by world
    consensus, so every rank counts alike). Each skip is a warning on rank 0; train.max_skipped_steps in a
    row stop the run with RunStopped, on every rank at the same step, before anything else is written."""

    def __init__(self, limit: int, what: str = "step"):
        self.limit, self.what, self.count = limit, what, 0

    def update(self, step: int, row: dict) -> None:
        if not row.get("skipped"):
            self.count = 0
            return
        self.count += 1
        if dist.get_rank() == 0:
            print(f"warning: {self.what} {step}: {SKIP_WARNING} (loss {_short(row.get('loss'))}, grad_norm "
                  f"{_short(row.get('grad_norm'))}; {self.count} in a row)", file=sys.stderr, flush=True)
        if self.limit and self.count >= self.limit:
            raise RunStopped(
                f"{self.what} {step}: {self.count} steps in a row skipped for a non-finite loss or gradient norm "
                f"(train.max_skipped_steps={self.limit}), so the run stops; no checkpoint or export holds "
                f"non-finite weights. Lower train.lr (the learning rate was {_short(row.get('lr'))}) or check the "
                f"data of steps {step - self.count + 1}-{step}")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def run_steps(cfg: RunConfig, start: int, logger: MetricsLogger, step: Callable[[int], dict],
              evaluate: Callable[[int], dict] | None = None,
              save: Callable[[int], None] | None = None) -> None:
    """Steps start..train.max_steps-1 (or to train.stop_at_step): `step(i)` returns its metrics row; `evaluate(done)` runs every
    eval.every_steps and at the end, `save(done)` every checkpoint.every_steps. A skipped step's row carries
    `warning`; train.max_skipped_steps skips in a row stop the run (SkipStreak)."""
    began = time.perf_counter()
    last = cfg.train.last_step
    streak = SkipStreak(cfg.train.max_skipped_steps)
    try:
        for i in range(start, last):
            row = step(i)
            done = i + 1
            if row.get("skipped"):
                row["warning"] = SKIP_WARNING
            logger.log({"step": done, **row, "elapsed_s": time.perf_counter() - began})
            streak.update(done, row)
            if evaluate is not None and due(cfg.eval.every_steps, done, last):
                logger.log({"step": done, **evaluate(done), "elapsed_s": time.perf_counter() - began})
            if save is not None and cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0:
                save(done)
                fault_point("after_checkpoint", done)
    except RunStopped:
        logger.close()  # a clean stop: TensorBoard / wandb keep every row logged so far
        raise


def finish(cfg: RunConfig, logger: MetricsLogger, tag: str, export: Callable[[str], object]) -> None:
    """The HF export (checkpoint.export_hf), the logs closed, rank 0's last line, and a barrier so that no
    rank leaves while another still writes."""
    folder = f"{cfg.output_dir}/hf"
    if cfg.checkpoint.export_hf:
        export(folder)
    logger.close()
    if dist.get_rank() == 0:
        latest = Checkpointer(cfg.output_dir).latest()
        outputs = ["metrics.jsonl", "config.yaml"] + ([f"checkpoints/{latest.name}"] if latest else []) + (
            ["hf/ (Hugging Face export)"] if cfg.checkpoint.export_hf else [])
        print(f"[{tag}] done: {logger.summary()}\n[{tag}] outputs in {cfg.output_dir}: {', '.join(outputs)}", flush=True)
    dist.barrier()
