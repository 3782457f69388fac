"""metrics.jsonl survives a kill in the middle of an append: the torn last row is dropped with a note on resume."""

from __future__ import annotations

import json

from automodel_mimo.config import RunConfig
from automodel_mimo.metrics import MetricsLogger


def _logger(tmp_path, start_step: int) -> MetricsLogger:
    cfg = RunConfig(output_dir=str(tmp_path))
    cfg.logging.progress = cfg.logging.tensorboard = False
    return MetricsLogger(cfg, start_step, enabled=True)


def test_torn_last_row_is_dropped_with_a_note_on_resume(tmp_path, capsys):
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 4, "loss": 0.2')  # killed mid-append
    logger = _logger(tmp_path, start_step=3)
    assert "metrics.jsonl: dropped 1 unreadable line(s)" in capsys.readouterr().err
    logger.log({"step": 4, "loss": 0.25})
    logger.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        *rows, {"step": 4, "loss": 0.25}]


def test_resume_keeps_rows_up_to_the_checkpoint_and_says_nothing(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, 6)))
    _logger(tmp_path, start_step=2).close()
    assert capsys.readouterr().err == ""
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))
