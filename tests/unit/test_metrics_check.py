"""metrics_check: aggregations, comparison operators, and exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from automodel_mimo.metrics.check import CheckError, check, main

# Train rows and eval rows interleaved, as the trainer writes them.
ROWS = [
    {"step": 1, "loss": 2.0, "grad_norm": 5.0},
    {"step": 2, "loss": 1.0, "grad_norm": 7.5},
    {"step": 2, "eval/accuracy": 0.5},
    {"step": 3, "loss": 0.25, "grad_norm": 3.0},
    {"step": 3, "eval/accuracy": 0.96},
]


@pytest.fixture
def metrics(tmp_path: Path) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize(
    "expr, ok, value",
    [
        ("loss@last < 0.3", True, 0.25),
        ("loss@first <= 2", True, 2.0),
        ("loss@min == 0.25", True, 0.25),
        ("loss@mean > 1.1", False, 3.25 / 3),
        ("loss@mean < 1.1", True, 3.25 / 3),
        ("grad_norm@max < 7.5", False, 7.5),
        ("grad_norm@max >= 7.5", True, 7.5),
        ("eval/accuracy@max >= 0.95", True, 0.96),
        ("eval/accuracy@first>=0.95", False, 0.5),
    ],
)
def test_aggregations_and_operators(expr: str, ok: bool, value: float) -> None:
    got_ok, got_value, line = check(ROWS, expr)
    assert got_value == pytest.approx(value)
    assert got_ok is ok
    assert line.startswith("PASS " if got_ok else "FAIL ")


def test_line_format() -> None:
    assert check(ROWS, "loss@last < 0.3")[2] == "PASS loss@last = 0.25 < 0.3"
    assert check(ROWS, "eval/accuracy@last >= 0.97")[2] == "FAIL eval/accuracy@last = 0.96 >= 0.97"


def test_nan_anywhere_fails_max() -> None:
    rows = [{"step": 1, "grad_norm": math.nan}, {"step": 2, "grad_norm": 1.0}]
    ok, value, _ = check(rows, "grad_norm@max < 100")
    assert not ok and math.isnan(value)


@pytest.mark.parametrize(
    "expr, why",
    [
        ("loss < 0.3", "malformed"),
        ("loss@median < 0.3", "unknown aggregation"),
        ("loss@last ~ 0.3", "malformed"),
        ("loss@last < abc", "not a number"),
        ("accuracy@last > 0.9", "never appears"),
    ],
)
def test_broken_checks_raise(expr: str, why: str) -> None:
    with pytest.raises(CheckError, match=why):
        check(ROWS, expr)


def test_main_exit_codes(metrics: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(metrics), "loss@last < 0.3", "eval/accuracy@last >= 0.95"]) == 0
    assert main([str(metrics), "loss@last < 0.3", "loss@last < 0.1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "PASS loss@last = 0.25 < 0.3", "PASS eval/accuracy@last = 0.96 >= 0.95",
        "PASS loss@last = 0.25 < 0.3", "FAIL loss@last = 0.25 < 0.1",
    ]


def test_main_reports_broken_checks_with_exit_2(
    metrics: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A failing check beside a broken one still exits 2: the run must be looked at, not just rerun.
    assert main([str(metrics), "loss@last < 0.1", "loss@last <"]) == 2
    assert main([str(metrics), "eval/bleu@max > 1"]) == 2
    assert main([str(tmp_path / "missing.jsonl"), "loss@last < 1"]) == 2
    assert main([str(metrics)]) == 2
    err = capsys.readouterr().err
    assert "malformed check 'loss@last <'" in err
    assert "'eval/bleu' never appears" in err
    assert "metrics file not found" in err
    assert "usage:" in err


def test_truncated_last_line_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.1}\n{"step": 2, "lo')
    assert main([str(path), "loss@last < 1"]) == 2
    assert "metrics.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_runs_as_module(metrics: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "automodel_mimo.metrics.check", str(metrics), "grad_norm@max < 100"],
        capture_output=True, text=True,
    )
    assert (proc.returncode, proc.stdout) == (0, "PASS grad_norm@max = 7.5 < 100\n")
