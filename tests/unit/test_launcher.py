"""Local launcher: per-rank env, fail-fast when a rank dies, and no orphaned processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from automodel_mimo.launch.local import is_worker_env, launch_local

REPO = Path(__file__).resolve().parents[2]

# Every child script starts with this: `out` is the test's tmp_path, `record` writes a file atomically
# so the test never reads a half-written pid.
PRELUDE = """
import json, os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
def record(name, text):
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)
"""

ENV_DUMP = """
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "FOO"]
seen = {k: os.environ.get(k) for k in keys}
seen["elastic"] = [k for k in os.environ if k.startswith("TORCHELASTIC_")]
record(f"env-{rank}.json", json.dumps(seen))
"""

# Rank 1 fails while rank 0 waits in a gloo all_reduce. Rank 1 first forks a worker (as a fork-based
# DataLoader does) that keeps its gloo sockets open, so rank 0 never sees the peer go away and would
# wait out gloo's 30-minute timeout. Rank 0 also has a Python SIGTERM handler, like a trainer that
# checkpoints on preemption: it cannot run while the main thread is inside C++, so only SIGKILL works.
GLOO_HANG = """
record(f"pid-{rank}", str(os.getpid()))
import torch
import torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
if rank == 0:
    signal.signal(signal.SIGTERM, lambda *_: None)
    dist.all_reduce(torch.ones(1))
    record("rank0-finished", "")
else:
    if os.fork() == 0:
        record("pid-worker", str(os.getpid()))
        time.sleep(600)
        os._exit(0)
    # Exit as soon as the traceback is out: torch's interpreter teardown can take seconds on a
    # loaded machine, and the test times the launcher, not that.
    hook = sys.excepthook
    sys.excepthook = lambda *exc: (hook(*exc), sys.stderr.flush(), os._exit(1))
    time.sleep(1.0)  # let rank 0 enter the all_reduce
    record("failed-at", repr(time.time()))
    raise RuntimeError("rank 1 exploded on purpose")
"""

# Rank 0 ignores SIGTERM; rank 1 fails once rank 0's handler is in place.
STUBBORN = """
if rank == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record("pid-0", str(os.getpid()))
    time.sleep(600)
while not (out / "pid-0").exists():
    time.sleep(0.01)
sys.exit(3)
"""

SELF_KILL = """
record(f"pid-{rank}", str(os.getpid()))
if rank == 1:
    while not (out / "pid-0").exists():  # rank 0 must be up (and its pid known) before rank 1 dies
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(600)
"""

# Every rank raises the same error (exit 3); rank 1 is quicker, rank 0 is the one that explains it.
AGREED_STOP = """
if rank == 0:
    time.sleep(1.0)
    print("stopped: the reason, from rank 0", file=sys.stderr, flush=True)
    record("rank0-explained", "")
sys.exit(3)
"""

SLEEPER = """
record(f"pid-{rank}", str(os.getpid()))
time.sleep(600)
"""


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(body))
    return [sys.executable, str(script), str(tmp_path)]


def _wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # An orphan reparented to a PID 1 that never reaps stays a zombie: dead, but still signalable.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pids(tmp_path: Path, names: list[str], timeout: float = 20.0) -> list[int]:
    assert _wait_for(lambda: all((tmp_path / n).exists() for n in names), timeout), names
    return [int((tmp_path / n).read_text()) for n in names]


def _all_dead(pids: list[int]) -> bool:
    # SIGKILL is delivered asynchronously; allow the kernel a moment to finish the exits.
    return _wait_for(lambda: not any(_alive(p) for p in pids), 3.0)


@pytest.fixture(autouse=True)
def _kill_leftovers(tmp_path: Path) -> Iterator[None]:
    """A failing test must not leave its 600 s sleepers behind."""
    yield
    for f in tmp_path.glob("pid-*"):
        pid = int(f.read_text())
        try:  # only our own children: their command line names this tmp_path
            if str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def _launcher_subprocess(cmd: list[str], nproc: int = 2) -> subprocess.Popen:
    code = (
        "import sys; from automodel_mimo.launch.local import launch_local; "
        f"sys.exit(launch_local({nproc}, {cmd!r}, grace_s=1.0))"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO)


def test_all_ranks_succeed_and_see_their_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "stale-from-an-outer-torchrun")
    assert launch_local(3, _child(tmp_path, ENV_DUMP), env={"FOO": "bar"}) == 0
    seen = [json.loads((tmp_path / f"env-{r}.json").read_text()) for r in range(3)]
    port = seen[0]["MASTER_PORT"]
    assert port.isdigit() and int(port) > 0
    for r, s in enumerate(seen):
        assert s == {
            "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "FOO": "bar", "elastic": [],
        }


def test_master_port_given_in_env_is_kept(tmp_path: Path) -> None:
    assert launch_local(1, _child(tmp_path, ENV_DUMP), env={"MASTER_PORT": "29517"}) == 0
    assert json.loads((tmp_path / "env-0.json").read_text())["MASTER_PORT"] == "29517"


def test_is_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not is_worker_env()
    monkeypatch.setenv("RANK", "1")
    assert is_worker_env()


@pytest.mark.timeout(60)
def test_failed_rank_stops_peer_blocked_in_gloo_all_reduce(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    grace_s = 2.0
    rc = launch_local(2, _child(tmp_path, GLOO_HANG), grace_s=grace_s)
    stopped_at = time.time()
    assert rc == 1
    stop_took = stopped_at - float((tmp_path / "failed-at").read_text())
    # Rank 0 was really stuck (it outlived the SIGTERM), and the SIGKILL came after the grace (the upper
    # bound only rules out "never": a loaded machine delays the kill, and timing is not what is tested).
    assert grace_s - 0.2 < stop_took < grace_s + 20.0
    assert not (tmp_path / "rank0-finished").exists()
    err = capfd.readouterr().err
    assert "RuntimeError: rank 1 exploded on purpose" in err
    assert "[launcher] rank 1 failed (exit code 1); stopping the other ranks" in err
    assert _all_dead(_pids(tmp_path, ["pid-0", "pid-1", "pid-worker"], timeout=0))


def test_rank_ignoring_sigterm_is_killed_after_grace(tmp_path: Path) -> None:
    start = time.monotonic()
    rc = launch_local(2, _child(tmp_path, STUBBORN), grace_s=1.0)
    took = time.monotonic() - start
    assert rc == 3
    assert 1.0 <= took < 30.0  # after the grace; the upper bound only rules out "never"
    assert _all_dead(_pids(tmp_path, ["pid-0"], timeout=0))


def test_agreed_exit_lets_the_explaining_rank_finish(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Codes every rank exits with together (the CLI's 2 and 3): the rank that prints why is not cut short."""
    assert launch_local(2, _child(tmp_path, AGREED_STOP), grace_s=3.0, agreed_exit_codes=(3,)) == 3
    assert (tmp_path / "rank0-explained").exists()
    assert "stopped: the reason, from rank 0" in capfd.readouterr().err


def test_rank_killed_by_signal_reports_128_plus_signum(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert launch_local(2, _child(tmp_path, SELF_KILL), grace_s=1.0) == 128 + signal.SIGKILL
    assert "[launcher] rank 1 failed (killed by SIGKILL)" in capfd.readouterr().err
    assert _all_dead(_pids(tmp_path, ["pid-0", "pid-1"], timeout=0))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_launcher_stops_ranks(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    launcher = _launcher_subprocess(_child(tmp_path, SLEEPER))
    try:
        pids = _pids(tmp_path, ["pid-0", "pid-1"])
        launcher.send_signal(sig)
        assert launcher.wait(timeout=10) == code
        assert _all_dead(pids)
    finally:
        launcher.kill()


def test_sigkilled_launcher_takes_ranks_down(tmp_path: Path) -> None:
    launcher = _launcher_subprocess(_child(tmp_path, SLEEPER))
    try:
        pids = _pids(tmp_path, ["pid-0", "pid-1"])
    finally:
        launcher.kill()
        launcher.wait()
    assert _all_dead(pids)
