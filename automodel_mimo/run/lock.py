"""One run per output_dir: `<output_dir>/.lock`, held for the whole run.

The launcher process takes it before any rank starts (under torchrun, where there is no launcher, rank 0
does). The file holds the holder's pid, host and start time for the messages; what makes it a lock is an
flock on it, which the kernel drops when the holder dies however it dies (SIGKILL included), so a lock
left behind by a dead run is simply free: the next run takes it over and says whose it was. Taking the
lock is also the writability check of output_dir (it creates the directory and a file in it).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from automodel_mimo.errors import UserInputError

LOCK_NAME = ".lock"


class OutputDirLock:
    def __init__(self, output_dir: str | Path, fd: int, created: bool):
        self.dir, self.path, self._fd, self._created = Path(output_dir), Path(output_dir) / LOCK_NAME, fd, created

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one takes the old file), then let go; a directory
        this lock created and nothing else wrote into is removed too."""
        if self._fd < 0:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
        if self._created:
            try:
                self.dir.rmdir()  # only succeeds when the run wrote nothing (it failed before starting)
            except OSError:
                pass

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def take_output_dir(output_dir: str | Path) -> OutputDirLock:
    """Create output_dir if needed and lock it for this process; UserInputError (one line) when it cannot be
    written or another live run holds it. Prints a note when it takes over the lock of a dead run."""
    root = Path(output_dir).expanduser()
    created = _make_dir(root, output_dir)
    _probe_writable(root, output_dir)
    while True:
        fd = _open(root / LOCK_NAME, output_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserInputError(f"output_dir={output_dir} is in use by another run ({_describe(holder)}); wait for "
                                 "it to end, stop it, or choose another output_dir") from None
        if _same_file(fd, root / LOCK_NAME):
            break
        os.close(fd)  # the holder released (and removed) the file between our open and our flock: try again
    previous = _read(fd)
    _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
    if previous:
        print(f"note: output_dir={output_dir}: took over the lock left by a run that is gone ({_describe(previous)})",
              file=sys.stderr, flush=True)
    return OutputDirLock(root, fd, created)


def _make_dir(root: Path, shown: str | Path) -> bool:
    """True when this call created the directory."""
    if root.is_dir():
        return False
    try:
        root.mkdir(parents=True)
    except FileExistsError:
        raise UserInputError(f"output_dir={shown} is a file, not a directory; choose another output_dir") from None
    except NotADirectoryError:
        raise UserInputError(f"output_dir={shown} lies under a file ({_file_above(root)}); choose another "
                             "output_dir") from None
    except OSError as e:
        raise UserInputError(f"output_dir={shown} cannot be created ({e.strerror}); choose a writable "
                             "output_dir") from None
    return True


def _file_above(root: Path) -> Path:
    return next((p for p in root.parents if p.exists() and not p.is_dir()), root)


def _probe_writable(root: Path, shown: str | Path) -> None:
    """Write and remove a file: permission bits say nothing for root, nor about read-only mounts or chattr +i."""
    probe = root / f".write_test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserInputError(f"output_dir={shown} is not writable ({e.strerror}); choose a writable output_dir "
                             "or fix its permissions") from None


def _open(path: Path, shown: str | Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserInputError(f"output_dir={shown}: cannot open its lock file {path} ({e.strerror}); remove it or "
                             "choose another output_dir") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"raw": text.strip()[:80]}


def _write(fd: int, record: dict) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return f"lock file content {holder.get('raw', '')!r}"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
