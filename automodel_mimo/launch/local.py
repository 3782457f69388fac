"""Local multi-rank launcher: one child process per rank, fail fast, leave no orphans.

torchrun waits for the rendezvous timeout when one rank dies while the others sit in a
collective; here the first non-zero exit stops every other rank within `grace_s`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

_PR_SET_PDEATHSIG = 1
# Resolved here, not in the forked child: dlopen after fork can deadlock when threads exist.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_POLL_S = 0.1
# Set in every rank our launchers (this one and launch.ray_launcher) start; torchrun's ranks lack it.
LAUNCHED_ENV = "AUTOMODEL_MIMO_LAUNCHED"


def is_worker_env() -> bool:
    """True inside a rank process started by `launch_local` or torchrun."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_local(
    nproc: int, cmd: list[str], *, env: dict[str, str] | None = None, grace_s: float = 5.0,
    agreed_exit_codes: tuple[int, ...] = (),
) -> int:
    """Run `cmd` as `nproc` ranks; return 0, the first failing rank's exit code, or 128+signal.

    `agreed_exit_codes`: codes every rank exits with together (an error all ranks raise alike, which one rank
    prints); after the first such exit the others get `grace_s` to leave on their own before SIGTERM, so the
    one that prints is not cut short."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    shared = _shared_env(nproc, env or {})
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    procs: list[subprocess.Popen] = []
    rc = None
    with _SignalLatch() as latch:
        try:
            for rank in range(nproc):
                procs.append(_spawn(cmd, {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
                _report_exit(rank, procs[-1], exits)
            rc = _supervise(nproc, exits, latch)
            return rc
        finally:
            if rc in agreed_exit_codes:
                _wait_all(procs, grace_s)
            _stop_all(procs, grace_s)


def _shared_env(nproc: int, extra: dict[str, str]) -> dict[str, str]:
    # TORCHELASTIC_* would make torch believe an elastic agent is managing these ranks.
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    base.update(extra)
    base.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    # Each rank would otherwise start one compute thread per core, so nproc ranks oversubscribe the cores
    # (a 2-rank CPU run is ~25% slower that way); torchrun sets 1. The user's own setting wins. The cores are
    # the ones this process may run on (taskset, a Slurm or container cgroup), not all of the machine's.
    base.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    return base


def free_port() -> int:
    """A TCP port free on this host now (best effort: another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Own session = own process group, so killpg reaches the rank's workers too; it also keeps
    # a terminal's Ctrl-C away from the ranks, which hear it from us as SIGTERM instead.
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with(os.getpid()))


def _die_with(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent_pid:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


def _report_exit(rank: int, proc: subprocess.Popen, exits: queue.Queue[tuple[int, int]]) -> None:
    # One waiter thread per rank queues exits in the order they happen, so the rank that
    # failed first is the one reported, not a peer that crashed a moment later because of it.
    waiter = threading.Thread(target=lambda: exits.put((rank, proc.wait())), daemon=True)
    waiter.start()


def _supervise(nproc: int, exits: queue.Queue[tuple[int, int]], latch: _SignalLatch) -> int:
    running = nproc
    while running:
        if latch.signum is not None:
            _say(f"received {signal.Signals(latch.signum).name}; stopping all ranks")
            return 128 + latch.signum
        try:
            rank, rc = exits.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        running -= 1
        if rc != 0:
            _say(f"rank {rank} failed ({_describe(rc)}); stopping the other ranks")
            return rc if rc > 0 else 128 - rc
    return 0


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the running ranks, SIGKILL whatever is left after grace_s, then reap."""
    for p in procs:
        if p.returncode is None:
            _killpg(p.pid, signal.SIGTERM)
    _wait_all(procs, grace_s)
    # Every group, exited leaders included: a dead rank's forked workers may still hold sockets.
    for p in procs:
        _killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # group already gone


def _describe(rc: int) -> str:
    if rc > 0:
        return f"exit code {rc}"
    try:
        return f"killed by {signal.Signals(-rc).name}"
    except ValueError:  # real-time signals have no name in the enum
        return f"killed by signal {-rc}"


def _say(msg: str) -> None:
    print(f"[launcher] {msg}", file=sys.stderr, flush=True)


class _SignalLatch:
    """Records SIGINT/SIGTERM while launching, so the poll loop can stop the ranks cleanly."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _SignalLatch:
        # signal.signal only works in the main thread; elsewhere the caller owns signals.
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            # None means a handler installed outside Python; the default is the closest we can do.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
