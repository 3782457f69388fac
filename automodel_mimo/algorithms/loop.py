"""What every run loop shares: resuming from the latest checkpoint, the step loop with its metrics rows,
periodic eval and checkpoints, and the end of a run (HF export, closing the logs, the last barrier).

The algorithms differ only in what one step and one eval do; those come in as functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.distributed as dist

from automodel_mimo.checkpoint import Checkpointer
from automodel_mimo.config import RunConfig
from automodel_mimo.faults import fault_point
from automodel_mimo.metrics import MetricsLogger
from automodel_mimo.run_record import record_run


def resume(cfg: RunConfig, model, optimizer) -> tuple[Checkpointer, int]:
    """The run's checkpointer and its first step: after the latest complete checkpoint when
    checkpoint.resume is set and one exists (model and optimizer loaded from it), else 0."""
    ckpt = Checkpointer(cfg.output_dir, cfg.checkpoint.keep_last)
    start = 0
    if cfg.checkpoint.resume and (latest := ckpt.latest()) is not None:
        start = ckpt.load(latest, model, optimizer)
    return ckpt, start


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


def run_steps(cfg: RunConfig, start: int, logger: MetricsLogger, step: Callable[[int], dict],
              evaluate: Callable[[int], dict] | None = None,
              save: Callable[[int], None] | None = None) -> None:
    """Steps start..train.max_steps-1: `step(i)` returns its metrics row; `evaluate(done)` runs every
    eval.every_steps and at the end, `save(done)` every checkpoint.every_steps."""
    began = time.perf_counter()
    last = cfg.train.max_steps
    for i in range(start, last):
        row = step(i)
        done = i + 1
        logger.log({"step": done, **row, "elapsed_s": time.perf_counter() - began})
        if evaluate is not None and due(cfg.eval.every_steps, done, last):
            logger.log({"step": done, **evaluate(done), "elapsed_s": time.perf_counter() - began})
        if save is not None and cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0:
            save(done)
            fault_point("after_checkpoint", done)


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
