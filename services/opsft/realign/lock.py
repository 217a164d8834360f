"""The exclusive lock on a realignment output folder: `<output>/.realign.lock` (opsft.locks)."""

from __future__ import annotations

from pathlib import Path

from opsft.locks import FileLock, LockedError, describe

__all__ = ["LockedError", "OutputLock"]


class OutputLock(FileLock):
    def __init__(self, folder: str | Path, wait: bool = False, poll_s: float = 1.0, timeout_s: float | None = None):
        super().__init__(Path(folder) / ".realign.lock", wait=wait, poll_s=poll_s, timeout_s=timeout_s)

    def busy(self, holder: dict) -> Exception:
        return LockedError(f"another realignment cycle is running on {self.path.parent} ({describe(holder)}); "
                           "wait for it to finish or pass --wait")
