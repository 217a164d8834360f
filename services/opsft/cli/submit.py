"""`opsft submit <command> ...`: run an opsft command as a Ray job on a cluster.

The working directory is uploaded (runtime_env working_dir, without .venv/.git/data
outputs), the command runs there as `python -m opsft.cli <command> ...`, and the job id is
printed. With `--wait` the job's logs are followed and the exit status is the job's.

    opsft submit --address http://head:8265 --wait score --input s3://b/c.parquet --output s3://b/s.parquet --ray
"""

from __future__ import annotations

import argparse
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


def follow(client, job_id: str, poll: float = 1.0) -> str:
    """Print the job's new log lines until it ends; returns its final status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll)


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
    status = follow(client, job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
