"""One run per output_dir: a live holder refuses a second run with one line, a dead holder's lock is taken over
with a note, and two CLI runs racing for one output_dir leave one run's rows and checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automodel_mimo.errors import UserInputError
from automodel_mimo.run.lock import LOCK_NAME, take_output_dir
from tests.unit.cli_runner import TINY, metrics, run_cli

REPO = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from automodel_mimo.run.lock import take_output_dir; take_output_dir(sys.argv[1]); " \
       "print('held', flush=True); time.sleep(120)"


def _holder(output_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_live_holder_refuses_and_dead_holders_lock_is_taken_over(tmp_path, capsys):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(UserInputError, match=rf"output_dir={tmp_path} is in use by another run \(pid {holder.pid} on "):
            take_output_dir(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: the file stays, the flock goes
        holder.wait()
    assert (tmp_path / LOCK_NAME).is_file()
    with take_output_dir(tmp_path):
        err = capsys.readouterr().err
        assert f"took over the lock left by a run that is gone (pid {holder.pid} on " in err
        assert str(os.getpid()) in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_removes_only_an_empty_directory_it_created(tmp_path):
    take_output_dir(tmp_path / "fresh").release()
    assert not (tmp_path / "fresh").exists()
    with take_output_dir(tmp_path / "used") as lock:
        (lock.dir / "metrics.jsonl").write_text("")
    assert (tmp_path / "used" / "metrics.jsonl").exists() and not (tmp_path / "used" / LOCK_NAME).exists()
    take_output_dir(tmp_path).release()  # existed before: stays
    assert tmp_path.is_dir()


def test_unusable_output_dirs_are_one_line_errors(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserInputError, match="is a file, not a directory"):
        take_output_dir(tmp_path / "a_file")
    with pytest.raises(UserInputError, match=r"lies under a file \(.*a_file\)"):
        take_output_dir(tmp_path / "a_file" / "run")


def test_two_cli_runs_racing_for_one_output_dir(tmp_path):
    """The second run stops at once with one line naming the first; the first finishes with its own rows only."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "automodel_mimo.cli", "sft", *TINY, "launch.nproc=2",
                              "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.resume=true",
                              f"output_dir={out}"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = run_cli("sft", *TINY, "launch.nproc=2", "train.max_steps=6", f"output_dir={out}", timeout=60)
        assert second.returncode == 2, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"output_dir={out} is in use by another run (pid {first.pid} on " in second.stderr
        assert first.poll() is None  # the first run was not disturbed
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    # nothing to resume in a fresh output_dir: said, not silent
    assert f"note: checkpoint.resume=true but {out}/checkpoints holds no usable checkpoint: starting at step 0" in err
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    assert not (out / LOCK_NAME).exists()
