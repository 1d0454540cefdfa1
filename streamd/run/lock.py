"""The run directory's lock: one trainer per run directory."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class RunLockedError(RuntimeError):
    pass


class RunLock:
    """An advisory lock on RUN/LOCK: a second trainer on the same run directory fails fast instead of corrupting it."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "LOCK"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise RunLockedError(f"run directory {run_dir} is in use by another trainer (pid {holder or '?'})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
