"""One exclusive file lock for every place that needs one (realignment output folders, the
scheduler's state folder, the embedded model's first conversion).

`fcntl.flock` on a lock file: the kernel releases it when the holding process dies, however it
dies, so a crash never blocks the next run. The file records who holds it (pid, host, since) for
the message a second process prints. flock is reliable on local disks and most cluster file
systems with lock support; on object stores put the folder on a mounted volume.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockedError(RuntimeError):
    """Another live process holds the lock."""


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


class FileLock:
    """`with FileLock(path):` holds an exclusive lock on `path`. Busy: raise `busy(holder)` at once
    (wait=False), or wait for it, polling every poll_s up to timeout_s (None: block until free)."""

    def __init__(self, path: str | Path, wait: bool = False, poll_s: float = 1.0, timeout_s: float | None = None):
        self.path = Path(path)
        self.wait, self.poll_s, self.timeout_s = wait, poll_s, timeout_s
        self._handle = None

    def busy(self, holder: dict) -> Exception:
        """The error raised when another process holds the lock (subclasses say what to do)."""
        return LockedError(f"{self.path} is locked by {describe(holder)}")

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open as long as the lock is held
        try:
            if self.wait and self.timeout_s is None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                self._try(handle)
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        return self

    def _try(self, handle) -> None:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not self.wait or time.monotonic() - start > self.timeout_s:
                    raise self.busy(self.holder()) from None
                time.sleep(self.poll_s)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
