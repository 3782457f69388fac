"""Run the real CLI in a subprocess, as a user would, with a tiny model for speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TINY = [
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2",
    "data.num_train=400", "data.num_eval=16", "train.global_batch_size=8", "train.micro_batch_size=2",
    "train.warmup_steps=1", "eval.every_steps=0", "logging.progress=false", "logging.tensorboard=false",
    "parallel.pp_microbatch_size=1",
]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300,
            python_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (`python_args`: the interpreter's own flags, e.g. ("-X", "importtime"))."""
    return subprocess.run([sys.executable, *python_args, "-m", "automodel_mimo.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[2])


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(output_dir) if "loss" in r}
