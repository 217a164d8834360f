"""Object storage end to end: an S3-compatible server on loopback (moto's server mode, started by the
session fixture in conftest.py; nothing leaves 127.0.0.1), and every command that reads or writes a
corpus, a report or a checkpoint given s3:// paths: score (in-process and --ray, with resume),
rewrite, pairs, report, train (input and checkpoints) and a whole realignment cycle whose inputs and
outputs are s3://. Each s3:// result is compared with the same command on local files. What needs a
POSIX folder (the cycle's state and lock, training's metrics) refuses s3:// in one line."""

from __future__ import annotations

import json

import pytest
from opsft.cli import main
from opsft.data import storage
from opsft.data.corpus import write_rows
from opsft.data.reader import read_rows

pytestmark = pytest.mark.slow


def corpus_rows() -> list[dict]:
    rows = [{"id": f"q{i}", "prompt": f"What is {i} plus {i + 2}?", "answer": str(2 * i + 2),
             "response": f"Adding them: {i} + {i + 2} = {2 * i + 2}. The answer is {2 * i + 2}."} for i in range(6)]
    rows.insert(2, {"id": "bad", "prompt": "", "response": "no prompt"})  # an error row travels along
    return rows


def same_rows(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, abs=tol), key
            else:
                assert y[key] == value, key


def test_score_rewrite_pairs_and_report_in_process_on_s3(bucket, tiny_dir, tmp_path, capsys):
    local_in = tmp_path / "in.jsonl"
    write_rows(corpus_rows(), local_in)
    remote_in = f"{bucket}/corpus/in.jsonl"
    write_rows(corpus_rows(), remote_in)
    assert storage.is_file(remote_in) and not storage.exists(f"{bucket}/corpus/out.jsonl")

    for where in (str(tmp_path), f"{bucket}/out"):
        source = str(local_in) if where == str(tmp_path) else remote_in
        assert main(["score", "--input", source, "--output", f"{where}/scored.parquet", "--model", tiny_dir]) == 0
        assert main(["rewrite", "--input", source, "--output", f"{where}/rw.jsonl", "--model", tiny_dir,
                     "--temperature", "0", "--max-new-tokens", "4", "--hint-max-new-tokens", "4"]) == 0
        assert main(["pairs", "--input", f"{where}/rw.jsonl", "--output", f"{where}/pairs.jsonl",
                     "--model", tiny_dir]) == 0
        assert main(["report", "--input", f"before={where}/scored.parquet", "--input", f"raw={source}",
                     "--output", f"{where}/report"]) == 2  # the raw corpus has no scores: refused in one line
        assert "input 'raw' has no scored rows" in capsys.readouterr().err
    for name in ("scored.parquet", "rw.jsonl", "pairs.jsonl"):
        same_rows(read_rows(str(tmp_path / name)), read_rows(f"{bucket}/out/{name}"))
    assert len(read_rows(f"{bucket}/out/scored.parquet")) == len(corpus_rows())
    # the report: inputs and output on s3, the same figures as on local files
    local = f"local={tmp_path}/scored.parquet"
    assert main(["report", "--input", f"s3in={bucket}/out/scored.parquet", "--input", local,
                 "--output", f"{bucket}/out/report"]) == 0
    assert main(["report", "--input", f"s3in={tmp_path}/scored.parquet", "--input", local,
                 "--output", str(tmp_path / "report")]) == 0
    remote = json.loads(storage.read_bytes(f"{bucket}/out/report/summary.json"))
    assert remote == json.loads((tmp_path / "report" / "summary.json").read_text())
    assert storage.read_bytes(f"{bucket}/out/report/cll_hist.png")[:4] == b"\x89PNG"
    assert not [e for e in storage.listdir(f"{bucket}/out/report") if e.base_name.startswith(".tmp-")]


def test_score_ray_on_s3_resumes_from_its_progress_records(bucket, ray_local, tiny_dir, tmp_path, capsys):
    remote_in = f"{bucket}/in.parquet"
    write_rows(corpus_rows(), remote_in)
    out = f"{bucket}/scored.parquet"
    args = ["score", "--input", remote_in, "--output", out, "--model", tiny_dir, "--ray", "--cpus", "0.25",
            "--rows-per-batch", "2", "--rows-per-part", "2"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert first["rows_in"] == first["rows_out_total"] == len(corpus_rows()) and first["rows_lost"] == 0
    assert first["parts"] >= 3 and first["error_rows"] == 1
    assert main(args) == 0  # everything is done: the rerun reads the progress records on s3 and does nothing
    again = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert again["rows_written"] == 0 and again["rows_skipped_already_done"] == len(corpus_rows())
    write_rows(corpus_rows(), tmp_path / "in.parquet")
    assert main(["score", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "s.parquet"),
                 "--model", tiny_dir]) == 0
    by_id = {r["id"]: r for r in read_rows(out)}
    for want in read_rows(tmp_path / "s.parquet"):
        got = by_id[want["id"]]
        assert got["error"] == want["error"]
        assert (got["cll"] is None) == (want["cll"] is None)
        if want["cll"] is not None:
            assert got["cll"] == pytest.approx(want["cll"], abs=1e-5)


def test_train_reads_s3_and_keeps_checkpoints_on_s3(bucket, ray_local, tiny_dir, tmp_path, capsys):
    write_rows(corpus_rows(), f"{bucket}/corpus.parquet")
    assert main(["train", "--input", f"{bucket}/corpus.parquet", "--output-dir", str(tmp_path / "run"),
                 "--storage-path", f"{bucket}/checkpoints", "--model", tiny_dir, "--max-steps", "2",
                 "--global-batch-size", "2", "--micro-batch-size", "1", "--max-length", "128",
                 "--checkpoint-every", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    checkpoint = summary["checkpoint"]
    assert checkpoint.startswith(f"{bucket}/checkpoints/") and storage.is_file(f"{checkpoint}/model.safetensors")
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # metrics stay in the POSIX output folder
    assert summary["data"]["train"]["error_rows"] == 1
    # the checkpoint on s3 is a model every engine loads (fetched to a local cache once)
    assert main(["score", "--input", f"{bucket}/corpus.parquet", "--output", str(tmp_path / "s.jsonl"),
                 "--model", checkpoint]) == 0
    assert len(read_rows(tmp_path / "s.jsonl")) == len(corpus_rows())
    assert main(["train", "--input", f"{bucket}/corpus.parquet", "--output-dir", f"{bucket}/run"]) == 2
    assert "output_dir (metrics.jsonl and TensorBoard logs" in capsys.readouterr().err


def test_a_realign_cycle_with_its_corpus_and_data_on_s3(bucket, ray_local, tiny_dir, tmp_path):
    from opsft.config import EngineConfig, PoolConfig, RealignConfig, RewriteConfig, SelectConfig, TrainConfig
    from opsft.realign.cycle import Cycle

    corpus = f"{bucket}/corpus.jsonl"
    write_rows(corpus_rows(), corpus)
    cfg = RealignConfig(corpus=corpus, output_dir=str(tmp_path / "state"), data_dir=f"{bucket}/realign",
                        model=tiny_dir, engine=EngineConfig(max_batch_size=8),
                        pool=PoolConfig(batch_size=4, num_cpus=0.25), rows_per_part=4,
                        select=SelectConfig(mode="quantile", quantile=0.5),
                        rewrite=RewriteConfig(max_new_tokens=4, hint_max_new_tokens=4, temperature=0.0),
                        train=TrainConfig(global_batch_size=2, micro_batch_size=1, max_steps=2, lr=1e-4,
                                          max_length=128, overlong="truncate", warmup_ratio=0.0))
    done = Cycle(cfg).run()
    assert done["status"] == "completed"
    data = f"{bucket}/realign/cycles/v0001"
    assert done["outputs"]["train"]["checkpoint"] == f"{data}/train/final"
    corpus_out = read_rows(f"{data}/corpus.parquet")
    assert len(corpus_out) == len(corpus_rows()) and sum(r["rewritten"] for r in corpus_out) == 3
    assert len(read_rows(f"{data}/rescored.parquet")) == len(corpus_rows())
    assert json.loads(storage.read_bytes(f"{data}/report/summary.json"))["sources"]["after"]["rows"] == 7
    latest = json.loads((tmp_path / "state" / "LATEST").read_text())
    assert latest["checkpoint"] == f"{data}/train/final" and latest["corpus"] == f"{data}/corpus.parquet"
    # unchanged inputs: nothing runs again
    again = Cycle(cfg.model_copy(update={"start_from": "model"})).run()
    assert again["status"] == "up-to-date"
    with pytest.raises(ValueError, match="output_dir .* must be a local or shared POSIX folder"):
        RealignConfig(corpus=corpus, output_dir=f"{bucket}/state")
