"""The recurring realignment: one job per cron tick, never two at once, with a history on disk.

    opsft schedule --config realign.yaml --cron "0 3 * * *"            # runs until stopped
    opsft schedule --config realign.yaml --once                         # the next tick, now
    opsft schedule --config realign.yaml --history                      # what ran, when, result, outputs

At each tick the Scheduler asks its submitter about the previous job: while that job is PENDING or
RUNNING the tick is SKIPPED (recorded); otherwise the previous job's end is recorded and a new job
is submitted. Between ticks it polls the running job every `poll_s` seconds, so a job's end is
recorded when it happens. Missed ticks (the scheduler was down) are not caught up. Fire times come
from opsft.realign.cron in the clock's time zone and keep its wall-clock time across daylight-saving
changes; they are compared and waited for as UTC instants (two times of one zone compare by their
wall clock, which is wrong inside a repeated autumn hour).

Submitters (both take the entrypoint as a shell command string):
- RayJobSubmitter: ray.job_submission.JobSubmissionClient(address).submit_job(...), with the
  working dir uploaded as runtime_env; used when --address or RAY_ADDRESS names a cluster.
- LocalSubmitter: a detached subprocess (no Ray head is started just to submit one command:
  that would be a second long-lived daemon with a dashboard, ~1 GB, for nothing the subprocess
  lacks; the cycle starts its own local Ray when it needs one). Its exit code goes to a file,
  so a restarted scheduler still learns how the job ended.

State folder (default `<realign output_dir>/.schedule`):
  history.jsonl   append-only; one record when a tick submits or skips, one more when the job ends
  current.json    the job in flight (so a restarted scheduler picks it up)
  lock            an flock: two schedulers for one state folder refuse to run; the OS drops the
                  lock when its process dies, so a crashed scheduler never blocks the next
  jobs/           local mode: <job id>.log and <job id>.rc
The clock, the sleep and the submitter are injectable (tests drive a fake clock).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from opsft.cluster import dashboard_address, job_runtime_env
from opsft.locks import FileLock, describe
from opsft.realign.cron import Cron, fire_times, next_fire_time, parse_cron

log = logging.getLogger(__name__)

ACTIVE = {"PENDING", "RUNNING"}
SUBMIT_FAILED = "SUBMIT_FAILED"  # the submission itself failed (cluster unreachable, ...)
LOST = "LOST"                    # the job is gone without a known result


class Submitter(Protocol):
    def submit(self, entrypoint: str, job_id: str) -> str: ...          # returns the job id
    def status(self, job_id: str) -> str: ...  # PENDING RUNNING SUCCEEDED FAILED STOPPED LOST


# ---------------------------------------------------------------------------- submitters


class RayJobSubmitter:
    """Ray jobs on a cluster (its dashboard address, e.g. http://head:8265)."""

    def __init__(self, address: str, working_dir: str | None = ".", pip: list[str] | None = None,
                 client=None, environ: dict | None = None):
        self.address = dashboard_address(address)
        self.runtime_env = job_runtime_env(working_dir, pip, environ)
        self._client = client

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, entrypoint: str, job_id: str) -> str:
        return self.client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=self.runtime_env,
                                      metadata={"opsft": "schedule"})

    def status(self, job_id: str) -> str:
        try:
            status = self.client.get_job_status(job_id)
        except RuntimeError as exc:  # the client's answer for a job id the cluster does not know
            if "does not exist" in str(exc) or "404" in str(exc):
                return LOST
            raise
        return str(getattr(status, "value", status)).split(".")[-1]


class LocalSubmitter:
    """The entrypoint as a detached subprocess of this machine; logs and exit code under jobs_dir."""

    def __init__(self, jobs_dir: str | Path, working_dir: str | None = None, environ: dict | None = None):
        self.jobs_dir = Path(jobs_dir)
        self.working_dir = working_dir
        self.environ = dict(os.environ if environ is None else environ)
        self.procs: dict[str, subprocess.Popen] = {}

    def paths(self, job_id: str) -> tuple[Path, Path, Path]:
        return (self.jobs_dir / f"{job_id}.log", self.jobs_dir / f"{job_id}.rc", self.jobs_dir / f"{job_id}.pid")

    def submit(self, entrypoint: str, job_id: str) -> str:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        log_path, rc_path, pid_path = self.paths(job_id)
        tmp = rc_path.with_suffix(".rc.tmp")
        # A subshell, so an entrypoint that calls `exit` still lets the exit code be written.
        script = f"(\n{entrypoint}\n)\necho $? > {shlex.quote(str(tmp))} && mv {shlex.quote(str(tmp))} " \
                 f"{shlex.quote(str(rc_path))}"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.working_dir, env=self.environ,
                                    start_new_session=True)
        pid_path.write_text(str(proc.pid))
        self.procs[job_id] = proc
        return job_id

    def details(self, job_id: str) -> dict:
        log_path, rc_path, _ = self.paths(job_id)
        out: dict = {"log": str(log_path)}
        if rc_path.exists():
            out["exit_code"] = int(rc_path.read_text().strip() or -1)
        return out

    def status(self, job_id: str) -> str:
        _, rc_path, pid_path = self.paths(job_id)
        proc = self.procs.get(job_id)
        if proc is not None:
            proc.poll()  # reap it, so a finished child is not a zombie that looks alive
        if rc_path.exists():
            return "SUCCEEDED" if rc_path.read_text().strip() == "0" else "FAILED"
        if proc is not None:
            return "RUNNING" if proc.returncode is None else LOST  # killed before writing its rc
        if pid_path.exists() and _alive(int(pid_path.read_text()), job_id):
            return "RUNNING"  # started by an earlier scheduler process
        return LOST


def _alive(pid: int, job_id: str) -> bool:
    """pid runs and (where /proc tells) is this job's shell, not a process that reused the pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True  # no /proc here: trust kill(pid, 0)
    try:
        cmdline = (proc / "cmdline").read_text(errors="replace")
        zombie = "\nState:\tZ" in (proc / "status").read_text(errors="replace")
    except OSError:
        return False
    # the cmdline is empty for an instant while the shell is being exec'd, and for a zombie
    return job_id in cmdline or (not cmdline and not zombie)


# ---------------------------------------------------------------------------- lock, history


class SchedulerBusy(RuntimeError):
    pass


class StateLock(FileLock):
    """An exclusive lock on <state_dir>/lock, held while a scheduler runs (released by the OS on death)."""

    def __init__(self, state_dir: str | Path):
        super().__init__(Path(state_dir) / "lock")

    def busy(self, holder: dict) -> Exception:
        return SchedulerBusy(f"a scheduler already runs for {self.path.parent} ({describe(holder)}); stop it "
                             "first, or use another --state-dir")


def read_history(state_dir: str | Path) -> list[dict]:
    """One entry per tick: the records of history.jsonl merged by job id (later records win)."""
    path = Path(state_dir) / "history.jsonl"
    merged: dict[str, dict] = {}
    if not path.exists():
        return []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write: keep going
            log.warning("%s line %d is not JSON; ignored", path, n + 1)
            continue
        key = record.get("job_id") or f"line-{n}"
        merged.setdefault(key, {}).update(record)
    return list(merged.values())


# ---------------------------------------------------------------------------- the scheduler


def _iso(t: datetime) -> str:
    return (t if t.tzinfo else t.astimezone()).isoformat(timespec="seconds")


def _instant(t: datetime) -> datetime:
    """An aware time as UTC (what to compare and subtract); a naive one as it is."""
    return t.astimezone(UTC) if t.tzinfo is not None else t


def preview(cron: str | Cron, after: datetime, n: int) -> list[tuple[str, str]]:
    """The next `n` fire times after `after`: (local ISO time with its UTC offset, the same in UTC)."""
    out = []
    for t in fire_times(cron, after, n):
        local = t if t.tzinfo else t.astimezone()
        out.append((local.isoformat(timespec="seconds"),
                    local.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")))
    return out


class Scheduler:
    """Submit `entrypoint` once per tick of `cron`, skipping ticks while the previous job runs.

    clock() returns the current wall time (naive local, or aware in the schedule's time zone);
    sleep(seconds) waits. `outputs` is where the cycle writes (recorded with each job); when it is a
    local folder, the sub-folders that appeared while the job ran are recorded as `new_outputs`."""

    def __init__(self, cron: str | Cron, entrypoint: str, state_dir: str | Path, submitter: Submitter,
                 outputs: str | None = None, clock: Callable[[], datetime] = datetime.now,
                 sleep: Callable[[float], None] | None = None, poll_s: float = 30.0, name: str = "realign"):
        import time

        self.cron = parse_cron(cron) if isinstance(cron, str) else cron
        self.entrypoint, self.submitter, self.outputs = entrypoint, submitter, outputs
        self.state_dir = Path(state_dir)
        self.clock, self.sleep = clock, sleep or time.sleep
        self.poll_s, self.name = poll_s, name
        self.history_path = self.state_dir / "history.jsonl"
        self.current_path = self.state_dir / "current.json"
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- records
    def _append(self, record: dict) -> dict:
        with open(self.history_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("schedule: %s", json.dumps(record, default=str))
        return record

    def current(self) -> dict | None:
        if not self.current_path.exists():
            return None
        return json.loads(self.current_path.read_text())

    def _set_current(self, job: dict | None) -> None:
        if job is None:
            self.current_path.unlink(missing_ok=True)
            return
        tmp = self.current_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job))
        os.replace(tmp, self.current_path)

    def _listing(self) -> list[str]:
        folder = Path(self.outputs) if self.outputs and "://" not in self.outputs else None
        if folder is None or not folder.is_dir():
            return []
        found = []  # two levels: the cycle writes <output_dir>/cycles/vNNNN
        for p in folder.iterdir():
            if p.is_dir() and not p.name.startswith("."):
                found.append(p.name)
                found += [f"{p.name}/{q.name}" for q in p.iterdir() if q.is_dir() and not q.name.startswith(".")]
        return sorted(found)

    # -- one step each
    def poll(self) -> dict | None:
        """Look at the job in flight; if it ended, record its end and return that record."""
        job = self.current()
        if job is None:
            return None
        try:
            status = self.submitter.status(job["job_id"])
        except Exception as exc:  # cluster briefly unreachable: ask again later
            log.warning("schedule: status of %s unknown (%s); will ask again", job["job_id"], exc)
            return None
        if status in ACTIVE:
            return None
        before = set(job.get("outputs_before", []))
        new = [n for n in self._listing() if n not in before]
        new = [n for n in new if not any(m.startswith(n + "/") for m in new)]  # cycles/v0001, not cycles
        record = {"job_id": job["job_id"], "status": status, "ended": _iso(self.clock()),
                  "new_outputs": [str(Path(self.outputs) / n) for n in new]}
        details = getattr(self.submitter, "details", None)
        if details is not None:
            record.update(details(job["job_id"]))
        self._set_current(None)
        return self._append(record)

    def tick(self, when: datetime | None = None) -> dict:
        """The work of one tick (at `when`, default now): skip, or submit. Returns the tick's record."""
        when = when or self.clock()
        self.poll()
        job = self.current()
        if job is not None:
            return self._append({"tick": _iso(when), "job_id": None, "status": "SKIPPED",
                                 "reason": f"previous job {job['job_id']} still running",
                                 "recorded": _iso(self.clock())})
        job_id = f"opsft-{self.name}-{when:%Y%m%d-%H%M}-{secrets.token_hex(3)}"
        record = {"tick": _iso(when), "job_id": job_id, "status": "SUBMITTED", "started": _iso(self.clock()),
                  "ended": None, "entrypoint": self.entrypoint, "outputs": self.outputs}
        # Recorded before the submission: a crash in between leaves a job id to ask the cluster about.
        self._set_current({"job_id": job_id, "outputs_before": self._listing()})
        try:
            self.submitter.submit(self.entrypoint, job_id)
        except Exception as exc:
            self._set_current(None)
            record.update(status=SUBMIT_FAILED, ended=_iso(self.clock()), error=f"{type(exc).__name__}: {exc}")
        return self._append(record)

    # -- loops
    def wait(self, job_id: str) -> dict:
        """Poll until `job_id` (the job in flight) ends; returns its merged history entry."""
        while (job := self.current()) is not None and job["job_id"] == job_id:
            if self.poll() is None:
                self.sleep(self.poll_s)
        return next(e for e in read_history(self.state_dir) if e.get("job_id") == job_id)

    def run(self, max_ticks: int | None = None) -> None:
        """Tick at every fire time of the cron expression; poll the running job in between."""
        next_at = next_fire_time(self.cron, self.clock())
        log.info("schedule: %r, next tick at %s", self.cron.text, _iso(next_at))
        ticks = 0
        while max_ticks is None or ticks < max_ticks:
            now = self.clock()
            if _instant(now) >= _instant(next_at):
                self.tick(next_at)
                ticks += 1
                later = next_fire_time(self.cron, max(now, next_at, key=_instant))
                if _instant(next_fire_time(self.cron, next_at)) < _instant(later):
                    log.warning("schedule: ticks between %s and %s were missed (not caught up)",
                                _iso(next_at), _iso(now))
                next_at = later
                continue
            self.poll()
            wait = (_instant(next_at) - _instant(now)).total_seconds()
            self.sleep(max(0.0, min(self.poll_s, wait)))
