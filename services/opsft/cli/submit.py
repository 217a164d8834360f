"""`opsft submit <command> ...`: run an opsft command as a Ray job on a cluster.

The working directory is uploaded (runtime_env working_dir, without .venv/.git/data
outputs), the command runs there as `python -m opsft.cli <command> ...`, and the job id is
printed. With `--wait` the job's logs are streamed as they are written (Ray's log tail, one
websocket) and the exit status is the job's: 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED.

    opsft submit --address http://head:8265 --wait score --input s3://b/c.parquet --output s3://b/s.parquet --ray
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time

from opsft.cluster import dashboard_address, job_runtime_env

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_parser(sub) -> None:
    parser = sub.add_parser("submit", help="submit an opsft command as a Ray job")
    parser.add_argument("--address", help="Ray dashboard address (default RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir (default .)")
    parser.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's status")
    parser.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's env")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="command ...", help="the opsft command and its flags")
    parser.set_defaults(run=run)


def build_submission(cmd: list[str], working_dir: str = ".", pip: list[str] | None = None,
                     environ: dict | None = None) -> dict:
    """Keyword arguments for JobSubmissionClient.submit_job: entrypoint and runtime_env."""
    from opsft.cli import COMMANDS

    if not cmd or cmd[0] not in COMMANDS or cmd[0] == "submit":
        raise ValueError(f"submit needs an opsft command first, one of {[c for c in COMMANDS if c != 'submit']}; "
                         f"got {cmd[:1]}")
    return {"entrypoint": "python -m opsft.cli " + shlex.join(cmd),
            "runtime_env": job_runtime_env(working_dir, pip, environ)}


def job_status(client, job_id: str) -> str:
    """PENDING RUNNING SUCCEEDED FAILED STOPPED (the JobStatus enum's name)."""
    return str(client.get_job_status(job_id)).split(".")[-1]


async def _stream(client, job_id: str, out, shown: list[int]) -> None:
    """Write the job's log chunks to `out` as Ray pushes them. shown[0]: the characters already shown
    (before a reconnection: Ray's tail starts again at the log's beginning), kept up to date."""
    seen = 0
    async for chunk in client.tail_job_logs(job_id):
        new = chunk[max(0, shown[0] - seen):]
        seen += len(chunk)
        if new:
            out.write(new)
            out.flush()
            shown[0] = seen


def follow(client, job_id: str, out=None, poll: float = 1.0, reconnects: int = 5) -> str:
    """Print the job's logs as they are written (JobSubmissionClient.tail_job_logs: one websocket,
    nothing downloaded twice) until the job ends; returns its final status. A stream that breaks while
    the job runs is opened again (up to `reconnects` times, without repeating what was shown)."""
    out = out or sys.stdout
    shown = [0]
    for attempt in range(reconnects + 1):
        try:
            asyncio.run(_stream(client, job_id, out, shown))
            break
        except RuntimeError as exc:  # the websocket closed abnormally, or the request failed
            if job_status(client, job_id) in TERMINAL or attempt == reconnects:
                print(f"opsft submit: the log stream of {job_id} broke ({exc}); waiting for the job's end",
                      file=sys.stderr, flush=True)
                break
            print(f"opsft submit: the log stream of {job_id} broke ({exc}); reconnecting", file=sys.stderr,
                  flush=True)
            time.sleep(poll)
    # the stream ends when the job does; its status can take a moment to say so
    while (status := job_status(client, job_id)) not in TERMINAL:
        time.sleep(poll)
    return status


def wait(client, job_id: str, out=None, poll: float = 1.0) -> int:
    """Follow the job to its end; print how it ended (stderr); the exit status: 0 if it SUCCEEDED, else 1."""
    try:
        status = follow(client, job_id, out, poll)
    except KeyboardInterrupt:
        print(f"opsft submit: stopped following; job {job_id} keeps running (`ray job stop {job_id}` ends it)",
              file=sys.stderr)
        return 130
    message = ""
    if status != "SUCCEEDED":
        try:
            message = client.get_job_info(job_id).message or ""
        except Exception:  # noqa: BLE001 - the reason is a nicety; the status says enough
            message = ""
    print(f"job {job_id}: {status}" + (f" ({' '.join(message.split())[:300]})" if message else ""),
          file=sys.stderr, flush=True)
    return 0 if status == "SUCCEEDED" else 1


def submit_with_retry(client, submission: dict, attempts: int = 10, wait: float = 3.0) -> str:
    """submit_job, retried while a freshly started cluster's job agent is not up yet."""
    for attempt in range(attempts):
        try:
            return client.submit_job(**submission)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


def run(args) -> int:
    from ray.job_submission import JobSubmissionClient

    submission = build_submission(args.cmd, args.working_dir, args.pip)
    client = JobSubmissionClient(dashboard_address(args.address))
    job_id = submit_with_retry(client, submission)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    return wait(client, job_id)
