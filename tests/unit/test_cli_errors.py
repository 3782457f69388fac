"""Bad input: one clear line naming the key, non-zero exit, no traceback, no hang, no process left."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.cli_runner import TINY, run_cli

REPO = Path(__file__).resolve().parents[2]


def _no_process_mentions(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1


@pytest.mark.parametrize("override,expected", [
    ("train.lrr=0.1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    ("train.max_steps=ten", "train.max_steps: expected int, got str 'ten'"),
    ("parallel.dp=3", "parallel.dp*tp*cp*pp = 3*1*1*1 = 3 but launch.nproc = 2"),
    ("train.global_batch_size=10", "train.global_batch_size=10 is not divisible by train.micro_batch_size*parallel.dp"),
    ("parallel.tp=3", "launch.nproc=2 is not divisible by parallel.tp*cp*pp=3"),
    ("parallel.pp_schedule=gpipe", "parallel.pp_schedule=gpipe: use one of 1f1b, interleaved1f1b"),
    ("parallel.pp=2 parallel.pp_microbatch_size=3", "train.micro_batch_size=2 must be a multiple of parallel.pp_microbatch_size=3"),
    ("parallel.pp=2 model.config.num_hidden_layers=3", "the model's 3 layers do not divide over 2 pipeline stages"),
    ("parallel.pp=2 parallel.pp_schedule=interleaved1f1b", "the model's 2 layers do not divide over 4 pipeline stages"),
    ("parallel.pp=2 parallel.tp=2 launch.nproc=4", "parallel.pp > 1 with parallel.tp > 1 is not supported yet"),
    ("parallel.pp=2 train.micro_batch_size=1 parallel.pp_microbatch_size=1", "1 pipeline microbatches, fewer than parallel.pp=2"),
])
def test_config_errors_are_one_clear_line(tmp_path, override, expected):
    r = run_cli("sft", *TINY, f"output_dir={tmp_path}", *override.split(), timeout=60)
    assert r.returncode == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _no_process_mentions(str(tmp_path))


def test_missing_config_file(tmp_path):
    r = run_cli("sft", "--config", str(tmp_path / "nope.yaml"), timeout=60)
    assert r.returncode == 2 and "nope.yaml: file not found" in r.stderr and "Traceback" not in r.stderr


def test_data_error_inside_ranks_stops_every_rank(tmp_path):
    """Errors found by the ranks themselves (here: data longer than data.max_seq_len) end the whole job."""
    r = run_cli("sft", *TINY, f"output_dir={tmp_path}", "data.max_seq_len=8", "launch.nproc=2", timeout=120)
    assert r.returncode == 2
    assert "data.max_seq_len=8" in r.stderr and "Traceback" not in r.stderr
    assert _no_process_mentions(str(tmp_path))


def test_a_crashed_rank_ends_the_job_at_once_with_one_traceback(tmp_path):
    """A rank that raises leaves without the interpreter's teardown (seconds with torch loaded), and so does
    the launcher; its peer, whose collective lost it, says so in one line (docs/reliability.md)."""
    cmd = [sys.executable, "-m", "automodel_mimo.cli", "sft", *TINY, f"output_dir={tmp_path}", "launch.nproc=2",
           "train.max_steps=4", "checkpoint.every_steps=2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            env={**os.environ, "AUTOMODEL_MIMO_FAULT": "after_checkpoint:2:raise"})
    raised, lines = None, []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("RuntimeError: [fault]"):
            raised = time.monotonic()
    rc = proc.wait(timeout=120)
    stderr = "".join(lines)
    assert rc == 1 and raised is not None, stderr
    assert time.monotonic() - raised < 2.0, stderr  # the teardown took 3-4 s here, 8-19 s in the drills
    assert stderr.count("Traceback") == 1 and "[launcher] rank 1 failed (exit code 1)" in stderr, stderr
    assert _no_process_mentions(str(tmp_path))


def test_help_lists_sections_and_docs():
    top = run_cli("--help", timeout=60)
    assert top.returncode == 0 and "commands:" in top.stdout and "Docs:" in top.stdout
    for algo in ("sft", "dpo", "grpo"):
        r = run_cli(algo, "--help", timeout=60)
        assert r.returncode == 0, r.stderr
        for section in ("launch", "parallel", "model", "data", "train", "eval", "checkpoint", "logging", "mimo"):
            assert f"\n  {section} " in r.stdout, (algo, section)
        assert f"{algo}_tiny.yaml" in r.stdout and "Docs:" in r.stdout


def test_no_command_prints_usage_not_an_argparse_error():
    r = run_cli(timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("usage: automodel-mimo {sft,dpo,grpo}")
    assert "the following arguments are required" not in r.stderr
    r = run_cli("sfx", timeout=60)
    assert r.returncode == 2 and "unknown command 'sfx'; use one of sft, dpo, grpo" in r.stderr


def test_model_shape_errors_are_found_without_importing_torch(tmp_path):
    """Checks that need the model's shape read model.config (or a local config.json) directly: on a busy machine
    importing torch and transformers alone took 12-60 s before the one-line error."""
    r = run_cli("sft", "parallel.tp=2", "model.config.num_attention_heads=3", f"output_dir={tmp_path}", timeout=120,
                python_args=("-X", "importtime"))
    assert r.returncode == 2 and "parallel.tp=2 must divide the model's num_attention_heads=3" in r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "automodel_mimo.config" in imported and not imported & {"torch", "transformers", "datasets"}
