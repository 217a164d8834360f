"""Ray start-up and runtime environments, in one place: every command that talks to a cluster
connects through `connect`, and every submitted job gets `job_runtime_env`.

- `connect(address)`: join a cluster (`address`, else RAY_ADDRESS), else start a local one.
- `driver_runtime_env()`: the env vars a driver passes to its Ray workers.
- `dashboard_address(given)`: the job API's HTTP address (`opsft submit`, `opsft schedule`).
- `job_runtime_env(...)`: the runtime env of a submitted job (working dir uploaded, env vars).
"""

from __future__ import annotations

import os

# Uploaded with a job's working dir: never these (environments, caches, data outputs).
EXCLUDES = [".git", ".venv", ".venv-*", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
            "*.parquet", "*.jsonl", "runs", "outputs"]
# Variables a driver or a submitter passes on to the cluster's processes.
PASSED_ENV = ("HF_HUB_OFFLINE", "OPSFT_HOME", "RAY_AUTH_MODE")
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Run first in every worker process of our jobs: the third-party deprecations that other packages raise in
# their own code (opsft.THIRD_PARTY_DEPRECATIONS) stay quiet in Ray's actors too (Ray Train's controller).
SETUP_HOOK = "opsft.quiet_third_party_deprecations"


def driver_runtime_env() -> dict | None:
    """The runtime env a driver gives its Ray workers: this process's PASSED_ENV variables. None
    inside a job submitted with `opsft submit`: the job's runtime env already carries them, and Ray
    refuses a driver env that sets the same keys."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor for the entrypoint
        return None
    return {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ},
            "worker_process_setup_hook": SETUP_HOOK}


def connect(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Join a cluster (`address` or RAY_ADDRESS), else start a local one (`num_cpus`, no
    dashboard); a no-op when this process is connected already."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=driver_runtime_env(), log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 runtime_env=driver_runtime_env())


def quiet_data_progress(dataset, interactive: bool | None = None) -> bool:
    """Outside a terminal (stdout not a TTY: a log file, a Ray job's driver log, `make demo`) turn Ray Data's
    progress off for this dataset (its own DataContext: other datasets of the process keep theirs), since
    there it logs a block of lines every 10 s. Returns whether it did; in a terminal the bars stay."""
    import sys

    if sys.stdout.isatty() if interactive is None else interactive:
        return False
    dataset.context.enable_progress_bars = False
    return True


def accelerator_types() -> list[str]:
    """The GPU types the connected Ray cluster reports (`accelerator_type:H100` resources), sorted; [] when
    this process is not connected or the nodes name none."""
    import ray

    if not ray.is_initialized():
        return []
    return sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))


def dashboard_address(given: str | None) -> str:
    """The job API's address: `given`, else RAY_ADDRESS, else the local default; a bare host:port
    means the dashboard's HTTP address."""
    address = given or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    return address if "://" in address else "http://" + address


def job_runtime_env(working_dir: str | None = ".", pip: list[str] | None = None,
                    environ: dict | None = None) -> dict:
    """The runtime env of a submitted job: PASSED_ENV from `environ` (default os.environ); with a
    working dir, that folder uploaded (without EXCLUDES) and its `services` package importable."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in PASSED_ENV if k in environ}
    runtime_env: dict = {"env_vars": env, "worker_process_setup_hook": SETUP_HOOK}
    if working_dir:
        runtime_env.update(working_dir=working_dir, excludes=EXCLUDES)
        env["PYTHONPATH"] = "services"  # the uploaded checkout's package, relative to the job's working dir
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env
