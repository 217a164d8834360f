"""`opsft schedule`: run the realignment cycle (`opsft realign --config ...`) on a cron schedule.

    opsft schedule --config realign.yaml --cron "0 3 * * *"                   # local: a subprocess per tick
    opsft schedule --config realign.yaml --cron "0 3 * * *" --address http://head:8265   # a Ray job per tick
    opsft schedule --config realign.yaml --once          # the next tick now; waits for the job (--detach: not)
    opsft schedule --config realign.yaml --history       # one line per tick: when, job, status, outputs
    opsft schedule --cron "*/30 * * * *" --timezone Europe/Paris --next 5   # the next 5 fire times, then exit

With --address (or RAY_ADDRESS) each tick submits a Ray job (the working dir is uploaded, as in
`opsft submit`; give --config relative to it or on storage the cluster sees). Without, the cycle
runs as a subprocess of this machine. A tick is skipped while the previous job still runs. The
history and the lock live in --state-dir (default: <output_dir of realign.yaml>/.schedule).
The cron expression keeps wall-clock time in --timezone (default: this machine's zone), across
daylight-saving changes as cron does (opsft/realign/cron.py); --next N shows what that means.
See opsft/realign/schedule.py for the details and docs/deployment.md for the cluster path.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import yaml


def add_parser(sub) -> None:
    parser = sub.add_parser("schedule", help="run the realignment cycle on a cron schedule (Ray jobs or local)")
    parser.add_argument("--config", help="the cycle's realign.yaml (passed to `opsft realign`); needed except "
                        "with --next")
    parser.add_argument("--schedule-config", help="YAML of ScheduleConfig fields; flags override it")
    parser.add_argument("--cron", help='5-field cron expression (default "0 3 * * *")')
    parser.add_argument("--timezone", help="IANA time zone of the cron expression (default: this machine's)")
    parser.add_argument("--address", help="Ray dashboard address (default RAY_ADDRESS; none = local subprocess)")
    parser.add_argument("--state-dir", help="history and lock folder (default <output_dir>/.schedule)")
    parser.add_argument("--working-dir", help="Ray mode: folder uploaded as the job's working dir (default .)")
    parser.add_argument("--no-upload", action="store_true", help="Ray mode: upload nothing (the image has opsft)")
    parser.add_argument("--entrypoint", help="the command each tick runs (default: opsft realign --config ...)")
    parser.add_argument("--poll-s", type=float, help="seconds between status checks (default 30)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run the next tick now, then exit")
    mode.add_argument("--history", action="store_true", help="print the history and exit")
    mode.add_argument("--next", type=int, metavar="N", help="print the next N fire times (local and UTC) and exit; "
                      "schedules nothing")
    parser.add_argument("--detach", action="store_true", help="with --once: do not wait for the job to end")
    parser.set_defaults(run=run)


def realign_output_dir(config_path: str) -> str | None:
    """`output_dir` of the realign config, read as plain YAML (the cycle validates the rest)."""
    data = yaml.safe_load(Path(config_path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{config_path}: a config file must hold a mapping")
    out = data.get("output_dir")
    return str(out) if out else None


def resolve(args, environ=None):
    """(ScheduleConfig, state_dir, outputs, address or None, entrypoint) from the flags."""
    environ = os.environ if environ is None else environ
    if not args.config:
        raise ValueError("--config (the cycle's realign.yaml) is needed, except with --next")
    if not Path(args.config).exists():
        raise FileNotFoundError(f"realign config {args.config} does not exist")
    cfg = schedule_config(args)
    if args.no_upload:
        cfg.working_dir = None
    outputs = realign_output_dir(args.config)
    state_dir = cfg.state_dir or (str(Path(outputs) / ".schedule") if outputs and "://" not in outputs else None)
    if state_dir is None:
        raise ValueError(f"{args.config} has no local output_dir: give --state-dir for the schedule's history")
    address = cfg.address or environ.get("RAY_ADDRESS") or None
    python = "python" if address else shlex.quote(sys.executable)
    entrypoint = cfg.entrypoint or f"{python} -m opsft.cli realign --config {shlex.quote(args.config)}"
    return cfg, state_dir, outputs, address, entrypoint


def schedule_config(args):
    """The ScheduleConfig of --schedule-config with the flags over it (the cron expression checked)."""
    from opsft.config import ScheduleConfig, load_config
    from opsft.realign.cron import parse_cron

    cfg = load_config(ScheduleConfig, args.schedule_config, {
        "cron": args.cron, "timezone": args.timezone, "address": args.address, "state_dir": args.state_dir,
        "working_dir": args.working_dir, "entrypoint": args.entrypoint, "poll_s": args.poll_s})
    parse_cron(cfg.cron)
    return cfg


def build_scheduler(args, environ=None):
    from opsft.realign.schedule import LocalSubmitter, RayJobSubmitter, Scheduler

    cfg, state_dir, outputs, address, entrypoint = resolve(args, environ)
    if address:
        submitter = RayJobSubmitter(address, working_dir=cfg.working_dir, pip=cfg.pip, environ=environ)
    else:
        submitter = LocalSubmitter(Path(state_dir) / "jobs", environ=environ)
    clock = _clock(cfg.timezone, environ)
    return Scheduler(cfg.cron, entrypoint, state_dir, submitter, outputs=outputs, clock=clock, poll_s=cfg.poll_s)


def _clock(timezone: str | None, environ=None):
    """now() in the schedule's zone (aware, so that fire times follow its daylight saving): the named
    IANA zone, else this machine's (TZ, else /etc/localtime); naive local time if neither is readable."""
    from datetime import datetime

    zone = _zone(timezone) if timezone else local_zone(environ)
    if zone is None:
        return datetime.now
    return lambda: datetime.now(zone)


def _zone(name: str):
    from zoneinfo import ZoneInfo

    try:
        return ZoneInfo(name)
    except Exception as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Paris)") from exc


def local_zone(environ=None, localtime: str = "/etc/localtime"):
    """This machine's time zone with its rules (not just today's offset), or None."""
    from zoneinfo import ZoneInfo

    environ = os.environ if environ is None else environ
    name = (environ.get("TZ") or "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except Exception:  # noqa: BLE001 - a POSIX TZ string such as CET-1CEST: fall back to the file
            pass
    try:
        with open(localtime, "rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return None


def print_next(args, now=None) -> int:
    """--next N: the next N fire times of the schedule after `now` (default: now), local (with its UTC
    offset) and UTC. Needs no realign config, takes no lock, submits nothing."""
    from opsft.realign.schedule import preview

    if args.next < 1:
        raise ValueError(f"--next {args.next}: give a number of fire times, 1 or more")
    cfg = schedule_config(args)
    clock = _clock(cfg.timezone)
    now = clock() if now is None else now.astimezone(clock().tzinfo)
    zone = cfg.timezone or "this machine's time zone"
    print(f"# {cfg.cron!r} in {zone}, after {now.isoformat(timespec='seconds')}", flush=True)
    for local, utc in preview(cfg.cron, now, args.next):
        print(f"{local}  {utc}")
    return 0


def print_history(entries: list[dict]) -> None:
    if not entries:
        print("no ticks yet")
    for e in entries:
        where = ", ".join(e.get("new_outputs") or []) or e.get("outputs") or ""
        extra = e.get("reason") or e.get("error") or ""
        print(f"{e.get('tick', '?'):25} {e.get('status', '?'):13} {e.get('job_id') or '-':38} "
              f"ended {e.get('ended') or '-':25} {where} {extra}".rstrip())


def run(args) -> int:
    from opsft.realign.schedule import SchedulerBusy, StateLock, read_history

    if args.next is not None:
        return print_next(args)
    sched = build_scheduler(args)
    if args.history:
        print_history(read_history(sched.state_dir))
        return 0
    try:
        lock = StateLock(sched.state_dir).acquire()
    except SchedulerBusy as exc:
        print(f"opsft schedule: {exc}", file=sys.stderr)
        return 3
    try:
        if args.once:
            record = sched.tick()
            print(json.dumps(record), flush=True)
            if record["status"] != "SUBMITTED" or args.detach:
                return 0 if record["status"] in ("SUBMITTED", "SKIPPED") else 1
            final = sched.wait(record["job_id"])
            print(json.dumps(final), flush=True)
            return 0 if final["status"] == "SUCCEEDED" else 1
        print(f"opsft schedule: {sched.cron.text!r} -> {sched.entrypoint}; history in {sched.history_path}; "
              "Ctrl-C to stop", file=sys.stderr, flush=True)
        sched.run()
    except KeyboardInterrupt:
        print("opsft schedule: stopped (a job in flight keeps running; the next start picks it up)", file=sys.stderr)
    finally:
        lock.release()
    return 0
