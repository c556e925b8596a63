"""Run ownership: one live process owns a run directory at a time.

The owner holds an advisory ``flock`` on ``<run_dir>/.owner.lock`` for as long as it works on the run, and writes
its PID, host and start time into that file. The operating system releases the lock when the process ends, however
it ends (SIGKILL, power loss of the process), so a dead owner never blocks a resume and nothing needs cleaning up.
A second ``explore --out``, ``--resume`` or ``--overwrite`` on a live run is refused in one line naming the owner;
readers (``load_run``, ``apply``, the notebook) are never blocked, and can ask whether the run is still live.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .store import StoreError

__all__ = ["RunLock", "LOCK_NAME", "live_owner"]

LOCK_NAME = ".owner.lock"

try:  # POSIX; elsewhere runs are not guarded against a second owner
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('since', 0)))}")


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def live_owner(run_dir: str | os.PathLike) -> dict | None:
    """The process that owns ``run_dir`` now (``{"pid", "host", "since"}``), or None when no live process does."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_owner(fd) or {"pid": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """The exclusive ownership of a run directory (a context manager; :meth:`acquire` creates the directory)."""

    def __init__(self, run_dir: Path, fd: int | None):
        self.run_dir, self._fd = run_dir, fd

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike) -> "RunLock":
        """Own ``run_dir``, or raise :class:`StoreError` naming the live owner."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return cls(run_dir, None)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise StoreError(f"{run_dir} is in use by a live run ({_describe(owner)}): wait for it to finish, or "
                             "stop it (Ctrl-C) and --resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(),
                  0)
        os.fsync(fd)
        return cls(run_dir, fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
