"""Rank 0's metric sinks: metrics.jsonl (one row per step / eval), TensorBoard, wandb, a progress bar.
Also the rule that combines per-microbatch metric shares (combine_metrics).

All values arrive already reduced over ranks (docs/numerics.md), so only rank 0 writes. On resume the rows of
steps after the checkpoint are dropped, so metrics.jsonl reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from automodel_mimo.config import RunConfig


class MetricsLogger:
    def __init__(self, cfg: RunConfig, start_step: int, enabled: bool):
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        self.last_train: dict = {}  # the latest step row and eval row, for the end-of-run summary
        self.last_eval: dict = {}
        if not enabled:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self._truncate_after(start_step)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1)
        if cfg.logging.wandb_project:
            self.wandb = _start_wandb(cfg)
        if cfg.logging.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.last_step, initial=start_step, desc=cfg.algo, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Keep the rows of steps <= `step`, so a resumed run's log reads as one run. A line that does not parse
        (the half row a kill in the middle of an append leaves) is dropped with a note. Rewritten atomically:
        a kill during the rewrite leaves the old file."""
        if not self.path.exists():
            return
        kept, torn = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            row = _parse_row(line)
            if row is None:
                torn += 1
            elif row.get("step", 0) <= step:
                kept.append(line)
        if torn:
            print(f"note: {self.path}: dropped {torn} unreadable line(s) (a row cut short when a run was killed "
                  "while writing it)", file=sys.stderr, flush=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if any(k.startswith("eval/") for k in row):
            self.last_eval = row
        else:
            self.last_train = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for key, value in numbers.items():
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.wandb:
            self.wandb.log(numbers, step=step)
        if self.bar:
            if "loss" in row:
                self.bar.n = step
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}", refresh=False)
                self.bar.refresh()
            else:
                self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def summary(self) -> str:
        """One line of the run's final numbers: step, loss and the last eval's metrics."""
        parts = []
        if self.last_train:
            parts.append(f"step {self.last_train['step']}")
            parts += [f"{k} {_fmt(self.last_train[k])}" for k in ("loss", "reward") if k in self.last_train]
            if "elapsed_s" in self.last_train:
                parts.append(f"{self.last_train['elapsed_s']:.0f}s of steps")
        if self.last_eval:
            evals = [f"{k} {_fmt(v)}" for k, v in self.last_eval.items()
                     if k.startswith("eval/") and not k.endswith("num_samples") and not k.endswith("num_pairs")]
            parts.append(", ".join(evals) + f" (held-out, step {self.last_eval['step']})")
        return "; ".join(parts)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _start_wandb(cfg: RunConfig):
    import wandb  # presence checked by config/checks.py, before any rank started

    return wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name, config=cfg.to_dict(),
                      dir=cfg.output_dir)
