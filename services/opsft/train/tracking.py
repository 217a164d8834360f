"""Experiment tracking of `opsft train`: params, per-step metrics and the final checkpoint to MLflow
and / or Weights & Biases (the `tracking` extra: pip install 'opsft[tracking]').

A `Tracker` is opened by the process that drives the run (`start`: the run's params, the whole
TrainConfig flattened; `log_checkpoint` and `finish` at the end: status FINISHED, FAILED or KILLED).
Metrics are logged by rank 0 only, through the MetricsWriter, so every scalar of metrics.jsonl and
TensorBoard reaches the trackers too. Under Ray Train the driver starts the run and hands its `handle`
(plain JSON) to the workers; rank 0 `attach`es to the same run (`worker_tracker`), so a Ray Train
restart after a worker failure keeps logging into that one run and the driver's final status wins.

MLflow: the run lives in a tracking store. Default `sqlite:///<output_dir>/mlruns/mlflow.db` with the
artifacts beside it in `<output_dir>/mlruns/artifacts/` (MLflow 3 refuses the old `./mlruns` file
store unless MLFLOW_ALLOW_FILE_STORE is set); a folder given as the URI gets the same layout; any other
URI (http(s)://server, a database) is used as is, and MLFLOW_TRACKING_URI is honoured when none is set.
Open the default store with `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns/mlflow.db`.

W&B: `wandb.init(mode="offline")` unless WANDB_MODE or `mode` says otherwise, writing under
`<output_dir>/wandb/` (`wandb sync <output_dir>/wandb/offline-run-*` uploads later). Each process
that writes opens the run with the same id (resume="allow"): one offline folder in a `--local` run,
two in a Ray run (rank 0's history, then the driver's checkpoint and exit status).

Why not ray.air.integrations.setup_mlflow / setup_wandb: setup_mlflow starts a new MLflow run at every
call (each Ray Train restart would be a run of its own, and the driver could not record the final
checkpoint and status in it); setup_wandb decides rank zero from the Ray Train V1 session, which Train
V2 (Ray 2.60's default) workers do not have, so every worker would log, and it passes the deprecated
`reinit=True` / WANDB_START_METHOD=fork. Both also import ray.tune. The rank-zero rule is one line here
(`worker_tracker`), and the stores are used through their own APIs (MlflowClient, wandb.init / log /
Artifact).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
EXTRA_HINT = "pip install 'opsft[tracking]'"
STATUSES = ("FINISHED", "FAILED", "KILLED")


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} tracking needs the optional `tracking` extra: {EXTRA_HINT} ({exc})") from None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"name": "idft"}, "adam_betas": [0.9, 0.95]} -> {"loss.name": "idft", "adam_betas": "[0.9, 0.95]"}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    value = data if data is None or isinstance(data, bool | int | float | str) else str(list(data))
    return {prefix[:-1]: value}


def training_params(cfg) -> dict[str, Any]:
    """The params of a run: the whole TrainConfig flattened (its tracking settings left out), plus
    `loss` (the loss name) and `model` (the model trained: resume_from, model, or the embedded default)."""
    from opsft.models import DEFAULT_MODEL_NAME

    data = cfg.model_dump(mode="json", exclude={"tracking"})
    params = flatten(data)
    params["loss"] = cfg.loss.name
    params["model"] = cfg.resume_from or cfg.model or DEFAULT_MODEL_NAME
    return params


def dir_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def checkpoint_mode(tcfg, path: str) -> str:
    """'files' (upload the checkpoint folder as an artifact) or 'path' (record where it is). auto: files for a
    local folder of at most checkpoint_files_max_mb, else path (a checkpoint on object storage is always a path)."""
    from opsft.data.storage import is_uri

    local = not is_uri(path) and Path(path).is_dir()
    if tcfg.log_checkpoint == "path" or not local:
        if tcfg.log_checkpoint == "files" and not local:
            log.warning("tracking: %s is not a local folder: logging its path only", path)
        return "path"
    if tcfg.log_checkpoint == "files":
        return "files"
    return "files" if dir_bytes(path) <= tcfg.checkpoint_files_max_mb * 2**20 else "path"


# ---------------------------------------------------------------------------- MLflow


def mlflow_uri(uri: str | None, output_dir: str | Path | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None = the store's default). None: the
    MLFLOW_TRACKING_URI environment variable, else a sqlite store in <output_dir>/mlruns/. A plain folder
    (no scheme): a sqlite store in it."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        if not output_dir:
            raise ValueError("MLflow tracking without a tracking_uri needs output_dir (the store goes to "
                             "<output_dir>/mlruns)")
        uri = str(Path(output_dir) / "mlruns")
    if "://" not in uri and uri not in ("databricks", "databricks-uc", "uc"):
        folder = Path(uri).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory's ./mlruns
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        return uri, (db.parent / "artifacts").resolve().as_uri()
    return uri, None


class MlflowBackend:
    name = "mlflow"

    def __init__(self, handle: dict):
        self.handle = handle
        mlflow = _require("mlflow", "MLflow")
        self.client = mlflow.MlflowClient(handle["tracking_uri"])
        self.run_id: str | None = handle.get("run_id")

    @classmethod
    def create(cls, cfg, output_dir) -> MlflowBackend:
        uri, artifacts = mlflow_uri(cfg.tracking_uri, output_dir)
        return cls({"tracking_uri": uri, "artifact_location": artifacts, "experiment": cfg.experiment,
                    "run_name": cfg.run_name})

    def start(self, params: dict, tags: dict) -> dict:
        from mlflow.entities import Param

        h = self.handle
        exp = self.client.get_experiment_by_name(h["experiment"])
        exp_id = exp.experiment_id if exp else self.client.create_experiment(h["experiment"],
                                                                            artifact_location=h["artifact_location"])
        run = self.client.create_run(exp_id, run_name=h["run_name"], tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, "None" if v is None else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        log.info("MLflow run %s in experiment %r of %s", self.run_id, h["experiment"], h["tracking_uri"])
        self.handle = {**h, "run_id": self.run_id}
        return self.handle

    def log_metrics(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_checkpoint(self, path: str, mode: str) -> None:
        self.client.set_tag(self.run_id, "checkpoint", path)
        if mode == "files":
            self.client.log_artifacts(self.run_id, path, artifact_path="checkpoint")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def close(self, ok: bool = True) -> None:
        pass


# ---------------------------------------------------------------------------- Weights & Biases


class WandbBackend:
    """A W&B run opened lazily in each process that writes to it (same id, resume="allow")."""

    name = "wandb"

    def __init__(self, handle: dict):
        self.handle = handle
        self.wandb = _require("wandb", "Weights & Biases")
        self.run = None

    @classmethod
    def create(cls, cfg, output_dir) -> WandbBackend:
        _require("wandb", "Weights & Biases")
        if not output_dir:
            raise ValueError("W&B tracking needs output_dir (its run folder goes to <output_dir>/wandb)")
        mode = os.environ.get("WANDB_MODE") or cfg.mode
        folder = Path(output_dir).resolve()
        return cls({"project": cfg.project, "entity": cfg.entity, "mode": mode, "dir": str(folder),
                    "run_name": cfg.run_name, "id": secrets.token_hex(6)})

    def _open(self):
        if self.run is None:
            h = self.handle
            Path(h["dir"]).mkdir(parents=True, exist_ok=True)
            self.run = self.wandb.init(project=h["project"], entity=h["entity"], mode=h["mode"], dir=h["dir"],
                                       id=h["id"], name=h["run_name"], config=h.get("config"), resume="allow",
                                       settings=self.wandb.Settings(console="off"))
        return self.run

    def start(self, params: dict, tags: dict) -> dict:
        self.handle = {**self.handle, "config": params}
        return self.handle

    def log_metrics(self, step: int, metrics: dict) -> None:
        self._open().log(metrics, step=step)

    def log_checkpoint(self, path: str, mode: str) -> None:
        run = self._open()
        run.summary["checkpoint"] = path
        if mode == "files":
            artifact = self.wandb.Artifact(f"checkpoint-{run.id}", type="model", metadata={"path": path})
            artifact.add_dir(path)
            run.log_artifact(artifact)

    def finish(self, status: str) -> None:
        self._open().finish(exit_code=0 if status == "FINISHED" else 1)
        self.run = None

    def close(self, ok: bool = True) -> None:
        """This process's writing ends (the run goes on in another process)."""
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


BACKENDS = {"mlflow": MlflowBackend, "wandb": WandbBackend}


# ---------------------------------------------------------------------------- the tracker


class Tracker:
    """The configured backends of one run. `start` in the driving process, `attach` elsewhere (rank 0 of
    a Ray Train job): both log metrics; the driving process logs the checkpoint and finishes the run."""

    def __init__(self, backends: list, tcfg=None):
        self.backends = backends
        self.tcfg = tcfg
        self.started = False

    @classmethod
    def from_config(cls, cfg) -> Tracker | None:
        """The trackers of a TrainConfig, or None when tracking is off. Raises ImportError naming the
        `tracking` extra when a library is missing, before any training starts."""
        t = cfg.tracking
        backends = []
        if t.mlflow.enabled:
            backends.append(MlflowBackend.create(t.mlflow, cfg.output_dir))
        if t.wandb.project:
            backends.append(WandbBackend.create(t.wandb, cfg.output_dir))
        return cls(backends, t) if backends else None

    @classmethod
    def attach(cls, handle: dict | None) -> Tracker | None:
        if not handle:
            return None
        tracker = cls([BACKENDS[name](h) for name, h in handle["backends"].items()])
        tracker.started = True
        return tracker

    def start(self, params: dict, tags: dict | None = None) -> dict:
        """Create the run(s) with their params; returns the handle workers attach with (JSON)."""
        tags = {k: str(v) for k, v in (tags or {}).items()}
        handles = {b.name: b.start(params, tags) for b in self.backends}
        self.started = True
        return {"backends": handles}

    def handle(self) -> dict:
        return {"backends": {b.name: b.handle for b in self.backends}}

    def log_metrics(self, step: int, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}
        for b in self.backends:
            try:
                b.log_metrics(int(step), scalars)
            except Exception:  # a tracking store down must not stop a training run
                log.exception("tracking: %s could not log step %d", b.name, step)

    def log_checkpoint(self, path: str | None) -> None:
        if not path:
            return
        mode = checkpoint_mode(self.tcfg, path)
        for b in self.backends:
            b.log_checkpoint(str(path), mode)

    def finish(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        for b in self.backends:
            try:
                b.finish(status)
            except Exception:
                log.exception("tracking: %s could not end the run as %s", b.name, status)

    def close(self, ok: bool = True) -> None:
        """An attached tracker's end in this process (rank 0 of a Ray Train job); the run itself goes on."""
        for b in self.backends:
            try:
                b.close(ok)
            except Exception:
                log.exception("tracking: %s could not close", b.name)


def check_available(cfg) -> None:
    """Raise ImportError naming the `tracking` extra when cfg.tracking asks for a library that is missing
    (before any data is read or worker started)."""
    if cfg.tracking.mlflow.enabled:
        _require("mlflow", "MLflow")
    if cfg.tracking.wandb.project:
        _require("wandb", "Weights & Biases")


def worker_tracker(handle: dict | None, rank: int) -> Tracker | None:
    """The tracker a Ray Train worker logs its metrics to: rank 0 only (the others log nothing)."""
    return Tracker.attach(handle) if rank == 0 else None


class tracked_run:
    """`with tracked_run(cfg) as tracker:` around a training run in the driving process: starts the run
    (params: the TrainConfig), ends it FINISHED, FAILED on an exception, KILLED on Ctrl-C. `tracker` is None
    when tracking is off. Log the final checkpoint with tracker.log_checkpoint(path) before leaving."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tracker: Tracker | None = None

    def __enter__(self) -> Tracker | None:
        self.tracker = Tracker.from_config(self.cfg)
        if self.tracker is not None:
            tags = {"opsft.output_dir": self.cfg.output_dir, "opsft.loss": self.cfg.loss.name}
            self.tracker.start(training_params(self.cfg), tags)
        return self.tracker

    def __exit__(self, kind, exc, tb) -> None:
        if self.tracker is not None:
            status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
            self.tracker.finish(status)
