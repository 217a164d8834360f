"""Experiment tracking of opsft train (opsft.train.tracking): a real local MLflow store (sqlite, the default
under <output_dir>/mlruns) read back with MlflowClient, and a W&B offline run read back from its .wandb
file, both compared with metrics.jsonl and the checkpoint folder; failure status, rank-zero-only logging,
the CLI flags and the missing-extra error. No network."""

from __future__ import annotations

import filecmp
import json
import struct
import warnings
from pathlib import Path

import pytest
from opsft.cli import main as cli_main
from opsft.config import RealignConfig, TrainConfig
from opsft.train import tracking
from opsft.train.loop import InjectedFailure, run_local
from opsft.train.metrics import read_metrics
from train_helpers import arithmetic_rows, save_tiny, write_corpus

mlflow = pytest.importorskip("mlflow")
TRACKING_LIBS = ("mlflow", "sqlalchemy", "alembic", "wandb")


@pytest.fixture
def setup(tmp_path, tiny_model, tokenizer, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_DIR", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    model_dir = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    corpus = write_corpus(tmp_path / "c.jsonl", arithmetic_rows(8))
    return model_dir, corpus


def _cfg(tmp_path, setup, out: str, **kw) -> TrainConfig:
    model_dir, corpus = setup
    base = dict(input=corpus, model=model_dir, output_dir=str(tmp_path / out), max_steps=3, global_batch_size=2,
                micro_batch_size=2, lr=3e-3, seed=7, eval_rows=2, eval_every=2, loss={"name": "dft"})
    return TrainConfig(**{**base, **kw})


def _tracking_warnings(caught) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
            if issubclass(w.category, DeprecationWarning | PendingDeprecationWarning | FutureWarning)
            and any(f"/{lib}/" in w.filename for lib in TRACKING_LIBS)]


def _run(client: mlflow.MlflowClient, experiment: str = "opsft") -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_mlflow_default_local_store_holds_params_every_step_the_checkpoint_and_finished(tmp_path, setup):
    cfg = _cfg(tmp_path, setup, "o", tracking={"mlflow": {"enabled": True}, "log_checkpoint": "files"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_local(cfg)
    assert _tracking_warnings(caught) == []
    db = tmp_path / "o" / "mlruns" / "mlflow.db"
    assert db.is_file() and not (Path.cwd() / "mlruns").exists()  # artifacts beside the store, not in the cwd
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    [run] = _run(client)
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert (p["loss"], p["loss.name"], float(p["lr"]), p["seed"], p["global_batch_size"]) == ("dft", "dft", 3e-3,
                                                                                            "7", "2")
    assert p["model"] == setup[0] and p["adam_betas"] == "[0.9, 0.95]" and p["max_length"] == "None"
    assert not any(k.startswith("tracking") for k in p)
    jsonl = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [m["step"] for m in jsonl] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
        assert history == [(m["step"], m[key]) for m in jsonl], key  # one value per step, exactly the JSONL's
    evals = sorted((m.step, m.value) for m in client.get_metric_history(rid, "eval_loss"))
    assert evals == [(m["step"], m["eval_loss"]) for m in jsonl if "eval_loss" in m] and len(evals) == 2
    checkpoint = Path(summary["checkpoint"])
    assert run.data.tags["checkpoint"] == str(checkpoint) == str(tmp_path / "o" / "checkpoints" / "step-000003")
    names = {Path(f.path).name for f in client.list_artifacts(rid, "checkpoint")}
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= names
    local = client.download_artifacts(rid, "checkpoint/model.safetensors", str(tmp_path / "dl"))
    assert filecmp.cmp(local, checkpoint / "model.safetensors", shallow=False)


def test_a_failed_run_ends_failed_and_path_mode_logs_no_files(tmp_path, setup):
    store = tmp_path / "store"  # a folder: a sqlite store in it, shared by both runs
    common = {"mlflow": {"enabled": True, "tracking_uri": str(store), "experiment": "exp1", "run_name": "r"}}
    with pytest.raises(InjectedFailure):
        run_local(_cfg(tmp_path, setup, "bad", fail_after_step=2, tracking=common))
    run_local(_cfg(tmp_path, setup, "good", max_steps=2, tracking={**common, "log_checkpoint": "path"}))
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    failed, good = _run(client, "exp1")
    assert (failed.info.status, good.info.status) == ("FAILED", "FINISHED")
    assert failed.info.run_name == "r"
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "loss")] == [1, 2]
    assert "checkpoint" not in failed.data.tags
    assert good.data.tags["checkpoint"] == str(tmp_path / "good" / "checkpoints" / "step-000002")
    assert client.list_artifacts(good.info.run_id) == []
    assert not (tmp_path / "bad" / "mlruns").exists()


def test_mlflow_tracking_uri_env_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.mlflow_uri(None, tmp_path) == ("http://mlflow.example:5000", None)
    assert tracking.mlflow_uri("https://srv", tmp_path) == ("https://srv", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri, artifacts = tracking.mlflow_uri(None, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert artifacts == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte W&B header, then a LevelDB-style log (32 KiB blocks of
    records: crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last), data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    records, pos, block, part = [], 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_wandb_offline_run_holds_the_config_every_step_and_the_checkpoint(tmp_path, setup):
    import wandb

    cfg = _cfg(tmp_path, setup, "o", tracking={"wandb": {"project": "opsft-test"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_local(cfg)
    assert _tracking_warnings(caught) == []
    [folder] = (tmp_path / "o" / "wandb").glob("offline-run-*")  # offline: one run folder, nothing uploaded
    [wandb_file] = folder.glob("run-*.wandb")
    wandb.teardown()  # wandb's service process writes the file; teardown waits for it (a CLI's atexit does too)
    records = _wandb_records(wandb_file)
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.append(items)
    jsonl = read_metrics(tmp_path / "o" / "metrics.jsonl")
    assert [(h["_step"], h["loss"], h["lr"]) for h in history] == [(m["step"], m["loss"], m["lr"]) for m in jsonl]
    config = {}  # wandb.init(config=...) goes in the run record; later changes in config records
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    assert config["lr"] == 3e-3 and config["loss"] == "dft" and config["loss.name"] == "dft"
    summary_items = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary_items.update({i.key: json.loads(i.value_json) for i in r.summary.update})
    assert summary_items["checkpoint"] == summary["checkpoint"]
    [artifact] = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]  # auto: small = files
    assert artifact.type == "model" and artifact.name.startswith("checkpoint-")
    assert {"model.safetensors", "config.json"} <= {e.path for e in artifact.manifest.contents}
    [exit_record] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_only_rank_zero_attaches_and_its_metrics_join_the_drivers_run(tmp_path):
    cfg = TrainConfig(input="x.jsonl", output_dir=str(tmp_path / "o"), tracking={"mlflow": {"enabled": True}})
    with tracking.tracked_run(cfg) as driver:
        handle = json.loads(json.dumps(driver.handle()))  # what a Ray Train worker receives
        assert tracking.worker_tracker(handle, rank=1) is None
        worker = tracking.worker_tracker(handle, rank=0)
        writer_metrics = {"step": 1, "loss": 2.5, "note": "text is not a metric", "tokens": 12}
        worker.log_metrics(1, writer_metrics)
        worker.close()
        driver.log_checkpoint(str(tmp_path / "not-written"))  # no folder: its path only
    client = mlflow.MlflowClient(handle["backends"]["mlflow"]["tracking_uri"])
    [run] = _run(client)
    assert run.info.run_id == handle["backends"]["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.metrics == {"loss": 2.5, "tokens": 12.0}
    assert run.data.tags["checkpoint"] == str(tmp_path / "not-written")


def test_cli_flags_and_realign_yaml_reach_the_training_config(tmp_path):
    from opsft.cli import build_parser
    from opsft.cli.train import config_from_args

    parser = build_parser()
    base = ["train", "--input", "c.jsonl", "--output-dir", str(tmp_path / "o")]
    cfg = config_from_args(parser.parse_args([*base, "--mlflow", "--wandb-project", "p", "--log-checkpoint", "path"]))
    t = cfg.tracking
    assert (t.mlflow.enabled, t.mlflow.tracking_uri, t.wandb.project, t.wandb.mode, t.log_checkpoint) == (
        True, None, "p", "offline", "path")
    cfg = config_from_args(parser.parse_args([*base, "--mlflow", "http://srv:5000", "--mlflow-experiment", "e"]))
    assert (cfg.tracking.mlflow.tracking_uri, cfg.tracking.mlflow.experiment, cfg.tracking.wandb.project) == (
        "http://srv:5000", "e", None)
    assert not config_from_args(parser.parse_args(base)).tracking.mlflow.enabled
    realign = RealignConfig(corpus="c.jsonl", output_dir=str(tmp_path / "r"),
                            train={"lr": 8e-6, "tracking": {"mlflow": {"enabled": True, "tracking_uri": "/s"}}})
    # the cycle's train stage copies cfg.train with its input/output fields replaced: tracking rides along
    stage = realign.train.model_copy(update={"input": "x", "output_dir": "y"})
    assert stage.tracking.mlflow.enabled and stage.tracking.mlflow.tracking_uri == "/s"


def test_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--mlflow [URI]" in out and "--wandb-project NAME" in out and "opsft[tracking]" in out


def test_a_missing_library_names_the_extra(tmp_path, monkeypatch, setup):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    cfg = _cfg(tmp_path, setup, "o", tracking={"mlflow": {"enabled": True}})
    with pytest.raises(ImportError, match=r"pip install 'opsft\[tracking\]'"):
        run_local(cfg)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before training


@pytest.mark.slow
def test_ray_train_logs_once_per_step_from_rank_zero_into_one_run_through_a_restart(tmp_path, setup, ray_local):
    """Two Ray Train workers, a failure after step 2 and Ray's restart from the step-2 checkpoint: the driver's
    one MLflow run gets each step's metrics exactly once (rank 0 only, the restart attaching to the same run),
    the final checkpoint's path (log_checkpoint path) and FINISHED."""
    from opsft.train.ray_job import run_ray

    cfg = _cfg(tmp_path, setup, "o", max_steps=4, global_batch_size=4, micro_batch_size=1, eval_rows=0,
               eval_every=0, checkpoint_every=1, fail_after_step=2, max_failures=1, scaling={"num_workers": 2},
               tracking={"mlflow": {"enabled": True}, "log_checkpoint": "path"})
    out = run_ray(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'o' / 'mlruns' / 'mlflow.db'}")
    [run] = _run(client)
    assert run.info.status == "FINISHED"
    jsonl = read_metrics(tmp_path / "o" / "metrics.jsonl")
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert out["strategy"] == "ddp" and {m["strategy"] for m in jsonl} == {"ddp"}  # not a tracked metric (a str)
    assert "strategy" not in run.data.metrics
    assert history == [(m["step"], m["loss"]) for m in jsonl]
    assert run.data.tags["checkpoint"] == out["checkpoint"]
    assert run.data.params["scaling.num_workers"] == "2"
