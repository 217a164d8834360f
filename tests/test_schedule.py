"""The recurring scheduler (opsft.realign.cron, opsft.realign.schedule, `opsft schedule`).

Cron: hand-computed fire times and a brute-force minute-by-minute scan. Scheduler: a fake clock
and a fake submitter (ticks, skip-while-running, history, restart, failures). The local
submitter runs real subprocesses; the Ray submitter's requests are checked against a fake
client, and once (slow) against a real Ray head with its job API.

    .venv/bin/python -m pytest -q tests/test_schedule.py
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from opsft.realign.cron import fire_times, next_fire_time, parse_cron
from opsft.realign.schedule import LocalSubmitter, RayJobSubmitter, Scheduler, SchedulerBusy, StateLock, read_history

# ---------------------------------------------------------------------------- cron

PARIS, NEW_YORK = ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York")


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def fires_utc(expr: str, after: datetime, n: int) -> list[datetime]:
    return [t.astimezone(UTC) for t in fire_times(expr, after, n)]


@pytest.mark.parametrize("expr, words", [
    ("* * * *", "needs 5 fields"), ("* * * * * *", "needs 5 fields"), ("60 * * * *", "bad minute"),
    ("* 24 * * *", "bad hour"), ("* * 0 * *", "bad day-of-month"), ("* * * 13 *", "bad month"),
    ("* * * * 8", "bad day-of-week"), ("5-1 * * * *", "bad minute"), ("*/0 * * * *", "bad minute"),
    ("* * * foo *", "bad month"), ("1,,2 * * * *", "bad minute"), ("@sometimes", "needs 5 fields"),
    ("0 0 30 2 *", "a day that none of its months has"),
])
def test_bad_expressions_are_value_errors_that_name_the_expression(expr, words):
    with pytest.raises(ValueError, match=re.escape(f"cron {expr!r}: ") + ".*" + re.escape(words)):
        parse_cron(expr)
    with pytest.raises(ValueError, match=re.escape(repr(expr))):
        next_fire_time(expr, datetime(2026, 1, 1))


def test_macros_and_names():
    assert parse_cron("@daily").expr == "0 0 * * *" and parse_cron("@daily").text == "@daily"
    after = datetime(2026, 11, 6, 17, 50)  # a Friday
    assert next_fire_time("@hourly", after) == datetime(2026, 11, 6, 18, 0)
    assert next_fire_time("@weekly", after) == datetime(2026, 11, 8)  # Sunday midnight
    assert next_fire_time("@monthly", after) == datetime(2026, 12, 1)
    assert next_fire_time("@yearly", after) == next_fire_time("@annually", after) == datetime(2027, 1, 1)
    assert fire_times("5/20 1,3-5 */10 jan-mar,dec 7", datetime(2026, 11, 30), 4) == [
        datetime(2027, 1, 31, 1, 5), datetime(2027, 1, 31, 1, 25), datetime(2027, 1, 31, 1, 45),
        datetime(2027, 1, 31, 3, 5)]  # as in cron, a day field that starts with * ("*/10": 1, 11, 21, 31)
    # counts as unrestricted, so the day rule is AND: the first of those days that is a Sunday (7)


@pytest.mark.parametrize("expr, after, expected", [
    ("0 3 * * *", datetime(2026, 11, 21, 22, 0), datetime(2026, 11, 22, 3, 0)),
    ("0 3 * * *", datetime(2026, 11, 22, 3, 0), datetime(2026, 11, 23, 3, 0)),       # strictly after
    ("0 3 * * *", datetime(2026, 11, 22, 2, 59, 59), datetime(2026, 11, 22, 3, 0)),
    ("*/15 9-17 * * mon-fri", datetime(2026, 11, 6, 17, 50), datetime(2026, 11, 9, 9, 0)),  # Fri -> Mon
    ("0 0 29 2 *", datetime(2026, 11, 6), datetime(2028, 2, 29)),                    # next leap day
    ("0 0 29 2 1", datetime(2026, 11, 6), datetime(2027, 2, 1)),   # dom OR dow: first Monday of Feb 2027
    ("30 4 1 * *", datetime(2026, 12, 31, 23, 59), datetime(2027, 1, 1, 4, 30)),    # year rollover
    ("0 0 31 * *", datetime(2026, 4, 1), datetime(2026, 5, 31)),                     # April has no 31st
])
def test_next_fire_time_hand_computed(expr, after, expected):
    assert next_fire_time(expr, after) == expected


def _expand(field: str, low: int, high: int, names: list[str] | None = None) -> set[int]:
    """The values a cron field allows, written out again (numbers, names, ranges, lists, steps)."""
    def value(token):
        return names.index(token.lower()) + low if names and token.lower() in names else int(token)
    out: set[int] = set()
    for part in field.split(","):
        base, _, step = part.partition("/")
        a, b = (low, high) if base == "*" else (value(base.split("-")[0]), value(base.split("-")[-1]))
        out.update(range(a, (high if step and "-" not in base else b) + 1, int(step or 1)))
    return out


def _brute_next(expr: str, after: datetime) -> datetime:
    """Minute-by-minute scan with the day rule written out again (Vixie: OR when both are restricted)."""
    m, h, dom, mon, dow = expr.split()
    minutes, hours, days = _expand(m, 0, 59), _expand(h, 0, 23), _expand(dom, 1, 31)
    months = _expand(mon, 1, 12, "jan feb mar apr may jun jul aug sep oct nov dec".split())
    weekdays = {d % 7 for d in _expand(dow, 0, 7, "sun mon tue wed thu fri sat".split())}
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while True:
        day_ok, week_ok = t.day in days, (t.weekday() + 1) % 7 in weekdays
        both = (day_ok or week_ok) if not dom.startswith("*") and not dow.startswith("*") else (day_ok and week_ok)
        if t.minute in minutes and t.hour in hours and t.month in months and both:
            return t
        t += timedelta(minutes=1)


def test_next_fire_time_matches_a_brute_force_scan():
    rng = random.Random(7)
    exprs = ["*/7 * * * *", "13 */5 * * *", "0 9-17/4 * * 1-5", "45 23 * * sun", "0 12 1,15 * *",
             "10 6 10 * 3", "*/30 2 * jan-mar,nov,dec *", "59 23 28-31 * *", "0 0 * * 6,0", "7 7 7 * *"]
    for expr in exprs:
        for _ in range(2):
            after = datetime(2026, 1, 1) + timedelta(minutes=rng.randrange(0, 366 * 24 * 60))
            assert next_fire_time(expr, after) == _brute_next(expr, after), (expr, after)


# Daylight saving, hand-computed. Europe/Paris: 2026-03-29 02:00 CET (+01) -> 03:00 CEST (+02), at 01:00Z;
# 2026-10-25 03:00 CEST -> 02:00 CET, at 01:00Z (local 02:00-02:59 twice: 00:00-00:59Z and 01:00-01:59Z).
# America/New_York: 2026-03-08 02:00 EST (-05) -> 03:00 EDT (-04), at 07:00Z; 2026-11-01 02:00 EDT ->
# 01:00 EST, at 06:00Z (local 01:00-01:59 twice: 05:00-05:59Z and 06:00-06:59Z).


def test_autumn_sub_hourly_fires_in_both_copies_of_the_repeated_hour():
    # the bug: the old parser went 00:00Z, 00:30Z, then 02:00Z (it skipped the second 02:00 and 02:30)
    after = datetime(2026, 10, 25, 1, 45, tzinfo=PARIS)  # 23:45Z on the 24th
    got = fire_times("*/30 * * * *", after, 6)
    assert [t.astimezone(UTC) for t in got] == [utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 0, 30),
                                                utc(2026, 10, 25, 1, 0), utc(2026, 10, 25, 1, 30),
                                                utc(2026, 10, 25, 2, 0), utc(2026, 10, 25, 2, 30)]
    assert [t.isoformat() for t in got[:5]] == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
                                                "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00",
                                                "2026-10-25T03:00:00+01:00"]
    # an hourly schedule (wildcard hour) fires every real hour, in both copies too
    assert fires_utc("0 * * * *", after, 3) == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2)]


def test_autumn_fixed_time_fires_once():
    got = fires_utc("30 2 * * *", datetime(2026, 10, 24, 12, 0, tzinfo=PARIS), 3)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30), utc(2026, 10, 27, 1, 30)]
    # asked from inside the second copy of the hour (02:15 CET, fold=1): not again that day, not in the past
    second = datetime(2026, 10, 25, 2, 15, tzinfo=PARIS, fold=1)
    assert second.utcoffset() == timedelta(hours=1)
    assert next_fire_time("30 2 * * *", second).astimezone(UTC) == utc(2026, 10, 26, 1, 30)
    # 03:00 every day: a night one hour longer
    before, after = fires_utc("0 3 * * *", datetime(2026, 10, 23, 12, 0, tzinfo=PARIS), 2)
    assert (before, after) == (utc(2026, 10, 24, 1, 0), utc(2026, 10, 25, 2, 0))


def test_spring_skipped_time_fires_at_the_jump():
    got = fire_times("30 2 * * *", datetime(2026, 3, 27, 12, 0, tzinfo=PARIS), 3)
    assert [t.astimezone(UTC) for t in got] == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0),
                                                utc(2026, 3, 30, 0, 30)]
    assert [t.isoformat() for t in got] == ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00",
                                            "2026-03-30T02:30:00+02:00"]
    # sub-hourly: 01:30 CET, then 03:00 CEST (no 02:xx exists that night): every real 30 minutes
    assert fires_utc("*/30 * * * *", datetime(2026, 3, 29, 1, 10, tzinfo=PARIS), 3) == [
        utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 29, 1, 30)]


def test_new_york_both_changes():
    assert fires_utc("*/30 * * * *", datetime(2026, 11, 1, 0, 40, tzinfo=NEW_YORK), 5) == [
        utc(2026, 11, 1, 5, 0), utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 0), utc(2026, 11, 1, 6, 30),
        utc(2026, 11, 1, 7, 0)]  # 01:00 EDT, 01:30 EDT, 01:00 EST, 01:30 EST, 02:00 EST
    assert fires_utc("30 1 * * *", datetime(2026, 10, 31, 12, 0, tzinfo=NEW_YORK), 2) == [
        utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]  # once, at 01:30 EDT; then 01:30 EST
    assert fires_utc("30 2 * * *", datetime(2026, 3, 7, 12, 0, tzinfo=NEW_YORK), 2) == [
        utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]  # at the jump (03:00 EDT); then 02:30 EDT
    assert fires_utc("*/20 * * * *", datetime(2026, 3, 8, 1, 30, tzinfo=NEW_YORK), 3) == [
        utc(2026, 3, 8, 6, 40), utc(2026, 3, 8, 7, 0), utc(2026, 3, 8, 7, 20)]  # 01:40 EST, 03:00 EDT, 03:20 EDT


def test_utc_has_no_daylight_saving():
    after = datetime(2026, 10, 25, 0, 10, tzinfo=ZoneInfo("UTC"))
    got = fire_times("*/30 * * * *", after, 4)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 0), utc(2026, 10, 25, 1, 30),
                   utc(2026, 10, 25, 2, 0)]
    assert all(t.utcoffset() == timedelta(0) for t in got)
    assert fires_utc("30 2 * * *", utc(2026, 3, 28, 12), 2) == [utc(2026, 3, 29, 2, 30), utc(2026, 3, 30, 2, 30)]


# ---------------------------------------------------------------------------- scheduler, fake clock


class FakeClock:
    def __init__(self, start: datetime):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.now.tzinfo is None:
            self.now += timedelta(seconds=seconds)
        else:  # real time passes: aware arithmetic in one zone would add wall-clock time
            self.now = (self.now.astimezone(UTC) + timedelta(seconds=seconds)).astimezone(self.now.tzinfo)


class FakeSubmitter:
    """Jobs that run `duration` on the fake clock; `fail` makes them end FAILED; `make_output` writes a folder."""

    def __init__(self, clock: FakeClock, duration: timedelta, outputs: Path | None = None):
        self.clock, self.duration, self.outputs = clock, duration, outputs
        self.jobs: dict[str, datetime] = {}
        self.submitted: list[tuple[str, str, datetime]] = []
        self.fail_submit = 0
        self.fail_status = 0
        self.fail_jobs = False

    def submit(self, entrypoint, job_id):
        if self.fail_submit:
            self.fail_submit -= 1
            raise ConnectionError("cluster unreachable")
        self.jobs[job_id] = self.clock()
        self.submitted.append((entrypoint, job_id, self.clock()))
        return job_id

    def status(self, job_id):
        if self.fail_status:
            self.fail_status -= 1
            raise ConnectionError("dashboard timeout")
        if job_id not in self.jobs:
            return "LOST"
        if self.clock() < self.jobs[job_id] + self.duration:
            return "RUNNING"
        if self.outputs is not None:
            (self.outputs / job_id).mkdir(parents=True, exist_ok=True)
        return "FAILED" if self.fail_jobs else "SUCCEEDED"


def make(tmp_path, start="2026-11-21 00:03", duration=5, cron="*/10 * * * *", poll_s=60.0):
    clock = FakeClock(datetime.fromisoformat(start))
    sub = FakeSubmitter(clock, timedelta(minutes=duration), tmp_path / "out")
    sched = Scheduler(cron, "opsft realign --config r.yaml", tmp_path / "state", sub, outputs=str(tmp_path / "out"),
                      clock=clock, sleep=clock.sleep, poll_s=poll_s)
    return clock, sub, sched


def test_ticks_submit_one_job_each_and_record_their_end(tmp_path):
    clock, sub, sched = make(tmp_path, duration=5)
    sched.run(max_ticks=3)
    assert [t for _, _, t in sub.submitted] == [datetime(2026, 11, 21, 0, m) for m in (10, 20, 30)]
    assert all(e == "opsft realign --config r.yaml" for e, _, _ in sub.submitted)
    sched.wait(sub.submitted[-1][1])
    hist = read_history(tmp_path / "state")
    assert [h["status"] for h in hist] == ["SUCCEEDED"] * 3
    for h, (_, job_id, at) in zip(hist, sub.submitted, strict=True):
        assert h["job_id"] == job_id and h["tick"] == at.astimezone().isoformat(timespec="seconds")
        ended = datetime.fromisoformat(h["ended"]).replace(tzinfo=None)
        assert at + timedelta(minutes=5) <= ended <= at + timedelta(minutes=6)  # seen within one poll
        assert h["outputs"] == str(tmp_path / "out") and h["new_outputs"] == [str(tmp_path / "out" / job_id)]
    assert max(clock.sleeps) <= 60.0


def test_a_tick_is_skipped_while_the_previous_job_runs(tmp_path):
    clock, sub, sched = make(tmp_path, duration=25)
    sched.run(max_ticks=4)  # 00:10 submit (ends 00:35), 00:20 skip, 00:30 skip, 00:40 submit
    assert [t.minute for _, _, t in sub.submitted] == [10, 40]
    hist = read_history(tmp_path / "state")
    assert [h["status"] for h in hist] == ["SUCCEEDED", "SKIPPED", "SKIPPED", "SUBMITTED"]
    assert hist[1]["reason"] == f"previous job {sub.submitted[0][1]} still running"
    assert [h["tick"][11:16] for h in hist] == ["00:10", "00:20", "00:30", "00:40"]
    # the raw file is append-only JSONL: 4 tick records + 1 end record
    lines = (tmp_path / "state" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(x) for x in lines)


def test_failures_are_recorded_and_the_schedule_goes_on(tmp_path):
    clock, sub, sched = make(tmp_path, duration=1)
    sub.fail_submit = 1
    sub.fail_jobs = True
    sched.run(max_ticks=2)
    hist = read_history(tmp_path / "state")
    assert hist[0]["status"] == "SUBMIT_FAILED" and "ConnectionError: cluster unreachable" in hist[0]["error"]
    assert hist[1]["status"] == "SUBMITTED"
    sub.fail_status = 3  # the dashboard does not answer for a while: no crash, the end is recorded later
    assert sched.wait(hist[1]["job_id"])["status"] == "FAILED"
    assert sched.current() is None


def test_a_restarted_scheduler_picks_up_the_job_in_flight(tmp_path):
    clock, sub, sched = make(tmp_path, duration=25)
    sched.run(max_ticks=1)  # 00:10 submitted, still running
    first = sub.submitted[0][1]
    again = Scheduler("*/10 * * * *", "x", tmp_path / "state", sub, clock=clock, sleep=clock.sleep, poll_s=60)
    assert again.current()["job_id"] == first
    again.run(max_ticks=3)  # 00:20 skip, 00:30 skip, 00:40 submit
    statuses = [h["status"] for h in read_history(tmp_path / "state")]
    assert statuses == ["SUCCEEDED", "SKIPPED", "SKIPPED", "SUBMITTED"]


def test_missed_ticks_are_not_caught_up(tmp_path):
    clock, sub, sched = make(tmp_path, duration=1)
    real_sleep = clock.sleep
    clock.sleep = lambda s: real_sleep(s + 3600)  # the machine slept through an hour of ticks
    sched.sleep = clock.sleep
    sched.run(max_ticks=2)
    ticks = [t for _, _, t in sub.submitted]
    assert len(ticks) == 2 and ticks[1] - ticks[0] >= timedelta(hours=1)


def test_the_scheduler_ticks_through_the_autumn_change_in_real_time(tmp_path):
    clock = FakeClock(datetime(2026, 10, 25, 1, 40, tzinfo=PARIS))  # 23:40Z
    sub = FakeSubmitter(clock, timedelta(minutes=5))
    sched = Scheduler("*/30 * * * *", "x", tmp_path / "state", sub, clock=clock, sleep=clock.sleep, poll_s=60)
    sched.run(max_ticks=5)
    assert [t.astimezone(UTC) for _, _, t in sub.submitted] == [
        utc(2026, 10, 25, 0, 0), utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 0), utc(2026, 10, 25, 1, 30),
        utc(2026, 10, 25, 2, 0)]
    hist = read_history(tmp_path / "state")
    assert [h["tick"] for h in hist] == ["2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
                                         "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00",
                                         "2026-10-25T03:00:00+01:00"]
    assert [h["status"] for h in hist] == ["SUCCEEDED"] * 4 + ["SUBMITTED"]  # none skipped: 30 real minutes apart
    assert max(clock.sleeps) <= 60.0


def test_once_ticks_now(tmp_path):
    clock, sub, sched = make(tmp_path, start="2026-11-21 00:03:30", duration=2)
    record = sched.tick()
    assert record["status"] == "SUBMITTED" and record["tick"].startswith("2026-11-21T00:03:30")
    assert sched.tick()["status"] == "SKIPPED"
    assert sched.wait(record["job_id"])["status"] == "SUCCEEDED"


# ---------------------------------------------------------------------------- lock


def test_two_schedulers_for_one_state_dir_refuse(tmp_path):
    with StateLock(tmp_path):
        with pytest.raises(SchedulerBusy, match=r"already runs .* \(pid \d+ on "):
            StateLock(tmp_path).acquire()
    with StateLock(tmp_path):  # released: free again
        pass


def test_a_dead_scheduler_does_not_hold_the_lock(tmp_path):
    code = ("import sys, time; sys.path.insert(0, 'services'); from opsft.realign.schedule import StateLock; "
            f"held = StateLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(SchedulerBusy, match=f"pid {proc.pid}"):
            StateLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    StateLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------------- submitters


def _wait_done(sub, job_id, timeout=300.0):
    # the timeout only guards against a hang (a shell one-liner on a loaded machine may take seconds)
    deadline = time.monotonic() + timeout
    while sub.status(job_id) == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    return sub.status(job_id)


def test_local_submitter_runs_detached_and_reports_exit_codes(tmp_path):
    sub = LocalSubmitter(tmp_path / "jobs", working_dir=str(tmp_path))
    sub.submit("echo hello; mkdir made", "ok-1")
    sub.submit("echo oops >&2; exit 3", "bad-1")
    assert _wait_done(sub, "ok-1") == "SUCCEEDED" and (tmp_path / "made").is_dir()
    assert _wait_done(sub, "bad-1") == "FAILED"
    assert sub.details("bad-1")["exit_code"] == 3
    assert (tmp_path / "jobs" / "ok-1.log").read_text() == "hello\n"
    assert (tmp_path / "jobs" / "bad-1.log").read_text() == "oops\n"


def test_local_job_survives_a_scheduler_restart_and_a_killed_job_is_lost(tmp_path):
    first = LocalSubmitter(tmp_path / "jobs")
    first.submit("sleep 30", "long-1")
    later = LocalSubmitter(tmp_path / "jobs")  # a new scheduler process: knows the job only from its files
    assert later.status("long-1") == "RUNNING"
    first.procs["long-1"].kill()
    first.procs["long-1"].wait()
    assert later.status("long-1") == "LOST"
    assert later.status("never-submitted") == "LOST"


class FakeJobClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs["submission_id"]

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        if job_id == "gone":
            raise RuntimeError("Request failed with status code 404: Job gone does not exist.")
        return JobStatus.RUNNING


def test_ray_submitter_builds_the_job_request():
    client = FakeJobClient()
    sub = RayJobSubmitter("head:8265", working_dir=".", pip=["x==1"], client=client,
                          environ={"HF_HUB_OFFLINE": "1", "SECRET": "no"})
    assert sub.address == "http://head:8265"
    assert sub.submit("python -m opsft.cli realign --config r.yaml", "opsft-realign-1") == "opsft-realign-1"
    call = client.calls[0]
    assert call["entrypoint"] == "python -m opsft.cli realign --config r.yaml"
    assert call["submission_id"] == "opsft-realign-1"
    env = call["runtime_env"]
    assert env["working_dir"] == "." and ".venv" in env["excludes"] and env["pip"] == ["x==1"]
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1", "PYTHONPATH": "services"}
    assert sub.status("opsft-realign-1") == "RUNNING" and sub.status("gone") == "LOST"
    bare = RayJobSubmitter("http://h:8265", working_dir=None, client=FakeJobClient(), environ={})
    bare.submit("opsft realign --config /data/r.yaml", "j")
    assert bare.client.calls[0]["runtime_env"] == {  # nothing uploaded: the image has opsft
        "env_vars": {}, "worker_process_setup_hook": "opsft.quiet_third_party_deprecations"}


# ---------------------------------------------------------------------------- the command


def _realign_yaml(tmp_path, output_dir=True) -> Path:
    cfg = tmp_path / ("realign.yaml" if output_dir else "no_output.yaml")
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\n" if output_dir else "input: c.jsonl\n")
    return cfg


def test_cli_resolves_modes_and_state_dir(tmp_path):
    from opsft.cli import build_parser
    from opsft.cli.schedule import build_scheduler, resolve

    cfg = _realign_yaml(tmp_path)
    args = build_parser().parse_args(["schedule", "--config", str(cfg)])
    _, state, outputs, address, entry = resolve(args, environ={})
    assert (state, outputs, address) == (str(tmp_path / "out" / ".schedule"), str(tmp_path / "out"), None)
    assert entry == f"{sys.executable} -m opsft.cli realign --config {cfg}"
    sched = build_scheduler(args, environ={"RAY_ADDRESS": "http://head:8265"})
    assert isinstance(sched.submitter, RayJobSubmitter) and sched.submitter.address == "http://head:8265"
    assert sched.entrypoint == f"python -m opsft.cli realign --config {cfg}"
    assert sched.cron.text == "0 3 * * *"
    with pytest.raises(ValueError, match="no local output_dir: give --state-dir"):
        resolve(build_parser().parse_args(["schedule", "--config", str(_realign_yaml(tmp_path, False))]), {})
    with pytest.raises(ValueError, match="unknown time zone"):
        build_scheduler(build_parser().parse_args(["schedule", "--config", str(cfg), "--timezone", "Mars/Olympus"]))


def test_cli_once_runs_the_tick_and_history_shows_it(tmp_path, capsys):
    from opsft.cli import main

    cfg = _realign_yaml(tmp_path)
    out = tmp_path / "out"
    flags = ["schedule", "--config", str(cfg), "--poll-s", "0.05"]
    assert main([*flags, "--once", "--entrypoint", f"mkdir -p {out}/cycles/v0001"]) == 0
    assert main([*flags, "--once", "--entrypoint", f"mkdir -p {out}/cycles/v0002; exit 4"]) == 1
    capsys.readouterr()
    assert main([*flags, "--history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "SUCCEEDED" in lines[0] and lines[0].endswith(str(out / "cycles" / "v0001"))  # the new cycle only
    assert "FAILED" in lines[1] and str(out / "cycles" / "v0002") in lines[1]
    with StateLock(out / ".schedule"):
        assert main([*flags, "--once", "--entrypoint", "true"]) == 3  # another scheduler holds it


def test_cli_next_prints_fire_times_and_schedules_nothing(tmp_path, capsys):
    from opsft.cli import build_parser, main
    from opsft.cli.schedule import print_next

    args = build_parser().parse_args(["schedule", "--cron", "*/30 * * * *", "--timezone", "Europe/Paris",
                                      "--next", "4"])
    assert print_next(args, now=utc(2026, 10, 24, 23, 50)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# '*/30 * * * *' in Europe/Paris, after 2026-10-25T01:50:00+02:00"
    assert lines[1:] == ["2026-10-25T02:00:00+02:00  2026-10-25T00:00:00Z",
                         "2026-10-25T02:30:00+02:00  2026-10-25T00:30:00Z",
                         "2026-10-25T02:00:00+01:00  2026-10-25T01:00:00Z",
                         "2026-10-25T02:30:00+01:00  2026-10-25T01:30:00Z"]
    # through main, now: no --config needed, no state folder made, nothing submitted
    cfg = tmp_path / "sched.yaml"
    cfg.write_text("cron: '0 3 * * *'\ntimezone: America/New_York\n")
    assert main(["schedule", "--schedule-config", str(cfg), "--next", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("# '0 3 * * *' in America/New_York, after ")
    for line in out[1:]:
        local, utc_text = line.split("  ")
        t = datetime.fromisoformat(local)
        assert (t.hour, t.minute) == (3, 0) and t.utcoffset() in (timedelta(hours=-4), timedelta(hours=-5))
        assert datetime.fromisoformat(utc_text.replace("Z", "+00:00")) == t
    assert list(tmp_path.iterdir()) == [cfg]
    assert main(["schedule", "--cron", "61 * * * *", "--next", "2"]) == 2
    assert "cron '61 * * * *': bad minute" in capsys.readouterr().err
    assert main(["schedule", "--once"]) == 2
    assert "--config" in capsys.readouterr().err


def test_local_zone_follows_tz_then_etc_localtime(tmp_path):
    from opsft.cli.schedule import _clock, local_zone

    assert local_zone({"TZ": "Europe/Paris"}).key == "Europe/Paris"
    assert local_zone({"TZ": ":America/New_York"}).key == "America/New_York"
    assert local_zone({"TZ": "Mars/Olympus"}, localtime=str(tmp_path / "none")) is None
    zone_file = Path(__import__("zoneinfo").TZPATH[0]) / "Europe" / "Paris"
    if zone_file.exists():  # the machine's zone from its file: with its rules, not just today's offset
        zone = local_zone({}, localtime=str(zone_file))
        assert datetime(2026, 7, 1, tzinfo=zone).utcoffset() == timedelta(hours=2)
        assert datetime(2026, 12, 1, tzinfo=zone).utcoffset() == timedelta(hours=1)
    assert _clock("Europe/Paris")().tzinfo == PARIS


# ---------------------------------------------------------------------------- a real Ray head (slow)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    """`ray start --head --block` with its dashboard (the job API), own temp dir and free ports, so it
    neither joins nor disturbs another Ray on this machine; stopping the --block process stops it all."""
    temp = tmp_path_factory.mktemp("rayhead")
    dash = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dash, "--dashboard-agent-listen-port": _free_port(),
             "--dashboard-agent-grpc-port": _free_port(), "--metrics-export-port": _free_port(),
             "--runtime-env-agent-port": _free_port(), "--ray-client-server-port": _free_port()}
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp}",
           *(f"{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(cmd, stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_real_ray_job_submission_through_the_scheduler(ray_head, tmp_path):
    sub = RayJobSubmitter(ray_head, working_dir=None, environ={})
    deadline = time.monotonic() + 600  # a hang guard: on a loaded 2-core machine the head takes minutes
    while True:  # the head's job agent comes up some seconds after the dashboard
        try:
            sub.submit("true", f"warmup-{time.monotonic_ns()}")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    sched = Scheduler("* * * * *", "python -c 'print(6 * 7)'", tmp_path / "state", sub, poll_s=0.5)
    record = sched.tick()
    assert record["status"] == "SUBMITTED"
    final = sched.wait(record["job_id"])
    assert final["status"] == "SUCCEEDED"
    assert sub.client.get_job_logs(record["job_id"]).splitlines()[-1] == "42"
    assert sub.status("never-submitted") == "LOST"


def job_client(address: str, deadline: float):
    """A JobSubmissionClient for the head at `address`, once its dashboard answers (it comes up some
    seconds after `ray start`)."""
    from ray.job_submission import JobSubmissionClient

    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError:
            assert time.monotonic() < deadline, "the head's dashboard never came up"
            time.sleep(1)


@pytest.mark.slow
def test_a_submitted_opsft_job_can_start_its_ray_driver(ray_head, tmp_path):
    """`opsft submit` passes HF_HUB_OFFLINE etc. in the job's runtime env; the job's driver then
    calls opsft.cluster.connect (every Ray command does), which used to pass the same
    variables again and made Ray refuse to start the driver ("Failed to merge the Job's runtime env")."""
    from opsft.cli.submit import build_submission, submit_with_retry

    submission = build_submission(["score"], working_dir=str(Path(__file__).resolve().parents[1]),
                                  environ={"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"})
    snippet = ("from opsft.cluster import connect; connect(); import os, ray; "
               "print('answer', ray.get(ray.remote(lambda: (6 * 7, os.environ['HF_HUB_OFFLINE'])).remote()))")
    submission["entrypoint"] = f"{sys.executable} -c \"{snippet}\""
    deadline = time.monotonic() + 600  # a hang guard: on a loaded 2-core machine the head takes minutes
    client = job_client(ray_head, deadline)
    job_id = submit_with_retry(client, submission)
    while str(client.get_job_status(job_id)).split(".")[-1] not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-2000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert str(client.get_job_status(job_id)).endswith("SUCCEEDED"), logs[-2000:]
    assert "answer (42, '1')" in logs  # the worker saw the job's environment


@pytest.mark.slow
def test_submit_wait_streams_a_real_jobs_logs(ray_head, tmp_path, capsys):
    """`opsft submit --wait` (opsft.cli.submit.wait) against a real job API: the job waits for a file
    that this test writes only once the job's first line has come through the stream, so the logs
    are shown while the job runs, not fetched at its end; then the exit status follows the job's."""
    from opsft.cli.submit import submit_with_retry, wait

    go = tmp_path / "go"

    class Out:
        def __init__(self):
            self.text = ""

        def write(self, chunk):
            self.text += chunk
            if "ready\n" in self.text:
                go.touch()

        def flush(self):
            pass

    deadline = time.monotonic() + 600  # a hang guard: on a loaded 2-core machine the head takes minutes
    client = job_client(ray_head, deadline)
    script = tmp_path / "job.py"
    script.write_text(f"import os, time\nprint('ready', flush=True)\nt = time.monotonic()\n"
                      f"while not os.path.exists({str(go)!r}) and time.monotonic() - t < 300:\n    time.sleep(0.1)\n"
                      f"print('streamed' if os.path.exists({str(go)!r}) else 'never streamed', flush=True)\n")
    job_id = submit_with_retry(client, {"entrypoint": f"{sys.executable} {script}"})
    out = Out()
    assert wait(client, job_id, out, poll=0.5) == 0
    assert out.text.splitlines()[-2:] == ["ready", "streamed"]
    assert out.text == client.get_job_logs(job_id)  # all of it, once
    assert capsys.readouterr().err.splitlines()[-1] == f"job {job_id}: SUCCEEDED"

    failing = submit_with_retry(client, {"entrypoint": "echo about to fail; exit 3"})
    out = Out()
    assert wait(client, failing, out, poll=0.5) == 1
    assert "about to fail" in out.text.splitlines() and out.text == client.get_job_logs(failing)
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"job {failing}: FAILED (")
