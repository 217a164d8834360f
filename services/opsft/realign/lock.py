"""An exclusive lock on a realignment output folder.

`fcntl.flock` on `<output>/.realign.lock`: the kernel releases it when the holding process
dies, however it dies, so a crashed cycle never blocks the next one. The file also records
who holds it (pid, host, since), for the message a second cycle prints. flock is reliable
on local disks and most cluster file systems with lock support; on object stores put the
output on a mounted volume (see docs/deployment.md).
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


class OutputLock:
    def __init__(self, folder: str | Path, wait: bool = False, poll_s: float = 1.0, timeout_s: float | None = None):
        self.path = Path(folder) / ".realign.lock"
        self.wait, self.poll_s, self.timeout_s = wait, poll_s, timeout_s
        self._handle = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait or (self.timeout_s is not None and time.monotonic() - start > self.timeout_s):
                    info = self.holder()
                    handle.close()
                    raise LockedError(
                        f"another realignment cycle is running on {self.path.parent} "
                        f"(pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}); "
                        "wait for it to finish or pass --wait") from None
                time.sleep(self.poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
