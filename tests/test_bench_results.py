"""`make bench` plumbing without a real benchmark: figures and ratios (benchmarks/_results.py),
the collector keeping the others' figures when one benchmark fails, subset runs merging into
the previous file, and the RESULTS.md table from a handmade results file (benchmarks/_collect.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _collect  # noqa: E402
from _results import OUT_ENV, Recorder, make_figure  # noqa: E402


def test_ratio_and_goal():
    f = make_figure("b", "batched", 30.0, "tok/s", baseline=("reference", 10.0), goal=(">=", 2.0, "doc"))
    assert f["ratio"] == pytest.approx(3.0)
    assert f["baseline"] == {"name": "reference", "value": 10.0}
    assert f["goal"] == {"op": ">=", "ratio": 2.0, "source": "doc"} and f["met"] is True
    slow = make_figure("b", "idft step", 1.2, "s", baseline=("sft", 1.0), goal=("<=", 1.10, "doc"))
    assert slow["ratio"] == pytest.approx(1.2) and slow["met"] is False
    assert make_figure("b", "x", 1.0, "s", baseline=("sft", 1.0), goal=("<=", 1.10, "doc"))["met"] is True
    plain = make_figure("b", "err", 1e-6, "nats")
    assert plain["baseline"] is None and plain["ratio"] is None and plain["met"] is None
    zero = make_figure("b", "x", 5.0, "s", baseline=("zero", 0.0), goal=(">=", 1.0, "doc"))
    assert zero["ratio"] is None and zero["met"] is None  # no ratio, so the goal is neither met nor missed
    skipped = make_figure("b", "vllm", None, "tok/s", baseline=("hf", 3.0), goal=(">=", 1.0, "doc"))
    assert skipped["ratio"] is None and skipped["met"] is None
    with pytest.raises(ValueError, match="goal operator"):
        make_figure("b", "x", 1.0, "s", baseline=("y", 1.0), goal=("=>", 1.0, "doc"))


def test_recorder_writes_only_when_told(tmp_path, monkeypatch):
    monkeypatch.delenv(OUT_ENV, raising=False)
    quiet = Recorder("demo", {"rows": 2})
    quiet.figure("speed", 2.0, "tok/s", baseline=("naive", 1.0))
    assert quiet.path is None and len(quiet.figures) == 1  # a standalone run only prints

    out = tmp_path / "figs.jsonl"
    monkeypatch.setenv(OUT_ENV, str(out))
    rec = Recorder("demo", {"rows": 2})
    rec.figure("speed", 2.0, "tok/s", baseline=("naive", 1.0))
    rec.skipped("vllm speed", "tok/s", "no venv")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [f["name"] for f in lines] == ["speed", "vllm speed"]
    assert lines[0]["ratio"] == 2.0 and lines[0]["settings"] == {"rows": 2}
    assert lines[0]["command"].startswith("python ")
    assert lines[1]["value"] is None and lines[1]["note"] == "skipped: no venv"


def fake_benchmark(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(BENCH)!r})\nfrom _results import Recorder\n{body}\n")
    return path


def test_failing_benchmark_is_recorded_and_others_kept(tmp_path):
    scripts = {
        "alpha": fake_benchmark(tmp_path, "alpha", "Recorder('alpha', {}).figure('a', 4.0, 'x', baseline=('b', 2.0))"),
        "broken": fake_benchmark(tmp_path, "broken", "Recorder('broken', {}).figure('half', 1.0, 's')\n"
                                 "print('boom: bad input', file=sys.stderr)\nsys.exit(3)"),
        "silent": fake_benchmark(tmp_path, "silent", "print('figures printed, none recorded')"),
        "zeta": fake_benchmark(tmp_path, "zeta", "Recorder('zeta', {}).figure('z', 1.0, 's', baseline=('b', 4.0))"),
    }
    runs, figures = _collect.run_benchmarks(scripts)
    assert [r["exit_code"] for r in runs] == [0, 3, 0, 0]
    res = _collect.assemble(runs, figures, {"cpu_count": 2}, "default", "2026-01-01T00:00:00+00:00")
    assert [f["benchmark"] for f in res["figures"]] == ["alpha", "broken", "zeta"]  # recorded before the crash: kept
    assert [f["ratio"] for f in res["figures"] if f["benchmark"] != "broken"] == [2.0, 0.25]
    fails = {f["benchmark"]: f for f in res["failures"]}
    assert set(fails) == {"broken", "silent"}
    assert fails["broken"]["exit_code"] == 3 and "boom: bad input" in fails["broken"]["stderr_tail"]
    assert "recorded no figure" in fails["silent"]["stderr_tail"]
    json.dumps(res)  # the file's content as written


def run(name: str, started: str) -> dict:
    return {"name": name, "command": f"python benchmarks/{name}.py", "exit_code": 0, "started": started,
            "seconds": 1.0, "load_average_start": [0.5, 0.5, 0.5], "stderr_tail": None}


def test_subset_run_keeps_previous_figures_of_same_settings():
    old = _collect.assemble([run("a", "T0"), run("b", "T0")],
                            [make_figure("a", "fa", 1.0, "s"), make_figure("b", "fb old", 1.0, "s")],
                            {}, "default", "T0")
    new = _collect.assemble([run("b", "T1")], [make_figure("b", "fb new", 2.0, "s")], {}, "default", "T1", old)
    assert [f["name"] for f in new["figures"]] == ["fa", "fb new"]
    assert [(r["name"], r.get("kept_from_run")) for r in new["runs"]] == [("a", "T0"), ("b", None)]
    quick = _collect.assemble([run("b", "T2")], [make_figure("b", "fb q", 2.0, "s")], {}, "quick", "T2", old)
    assert [f["name"] for f in quick["figures"]] == ["fb q"]  # quick figures never mix with default ones


def test_results_md_from_handmade_file():
    results = {
        "generated": "2026-01-02T03:04:05+00:00", "settings": "default",
        "machine": {"cpu_count": 2, "platform": "Linux-x", "python": "3.11.7", "torch": "2.9.0", "torch_threads": 2,
                    "cuda": None, "load_average": [1.5, 2.0, 2.5]},
        "runs": [run("serve_load", "2026-01-02T03:04:05+00:00"), dict(run("train_step", "T"), exit_code=1)],
        "figures": [
            {"benchmark": "serve_load", "name": "throughput, batching on, 16 clients", "value": 1.86, "unit": "req/s",
             "baseline": {"name": "batching off", "value": 1.03}, "ratio": 1.86 / 1.03,
             "goal": {"op": ">=", "ratio": 2.0, "source": "serve_load.py docstring"}, "met": False, "note": None},
            {"benchmark": "serve_load", "name": "p99 latency", "value": 9833.0, "unit": "ms",
             "baseline": {"name": "batching off", "value": 16481.0}, "ratio": 9833 / 16481, "goal": None,
             "met": None, "note": "under load"},
            {"benchmark": "score_throughput", "name": "max |dphi|", "value": 3.2e-6, "unit": "nats/token",
             "baseline": None, "ratio": None, "goal": None, "met": None, "note": None},
        ],
        "failures": [{"benchmark": "train_step", "exit_code": 1, "stderr_tail": "Traceback\nRuntimeError: oom\n"}],
    }
    md = _collect.render_markdown(results)
    lines = md.splitlines()
    assert "| benchmark | figure | value | unit | baseline | ratio | goal | met? |" in lines
    assert ("| serve_load | throughput, batching on, 16 clients | 1.86 | req/s | batching off: 1.03 | 1.81x "
            "| >= 2x | **no** |") in lines
    assert "| serve_load | p99 latency [1] | 9,833 | ms | batching off: 16,481 | 0.597x |  |  |" in lines
    assert "| score_throughput | max \\|dphi\\| | 3.20e-06 | nats/token |  |  |  |  |" in lines
    assert "[1] under load" in lines
    assert "settings: **default**" in md and "2 CPUs" in md and "torch 2.9.0 (2 threads)" in md
    assert "load average at start 1.5 / 2.0 / 2.5" in md
    assert "## Failures" in md and "RuntimeError: oom" in md and "**train_step** exited 1" in md
    assert "| train_step | `python benchmarks/train_step.py` | 1.0 | 1 |" in md


def test_collector_exits_nonzero_after_writing_everything(tmp_path, monkeypatch):
    scripts = {"good": fake_benchmark(tmp_path, "good", "Recorder('good', {}).figure('g', 2.0, 's')"),
               "bad": fake_benchmark(tmp_path, "bad", "sys.exit(2)")}
    monkeypatch.setattr(_collect, "discover", lambda: scripts)
    monkeypatch.setattr(_collect, "machine_info", lambda: {"cpu_count": 1})  # no torch import
    out, md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    monkeypatch.setattr(sys, "argv", ["_collect.py", "--out", str(out), "--md", str(md)])
    assert _collect.main() == 1
    res = json.loads(out.read_text())
    assert [f["name"] for f in res["figures"]] == ["g"] and res["failures"][0]["benchmark"] == "bad"
    assert res["settings"] == "default" and "## Failures" in md.read_text()
    monkeypatch.setattr(sys, "argv", ["_collect.py", "--only", "good", "--out", str(out), "--md", str(md)])
    assert _collect.main() == 0  # the kept failure of `bad` is in the file but is not this run's
    assert json.loads(out.read_text())["failures"][0]["benchmark"] == "bad"


def test_runs_name_their_machine_and_kept_runs_keep_theirs():
    gpu = {"cpu_count": 16, "cuda": "NVIDIA H200"}
    old = _collect.assemble([run("gpu_check", "T0")], [make_figure("gpu_check", "g", 1.0, "s")], gpu, "default", "T0")
    cpu = {"cpu_count": 2, "cuda": None}
    new = _collect.assemble([run("a", "T1")], [make_figure("a", "fa", 1.0, "s")], cpu, "default", "T1", old)
    assert {r["name"]: r["machine"] for r in new["runs"]} == {"a": cpu, "gpu_check": gpu}
    md = _collect.render_markdown(dict(new, machine=cpu)).splitlines()
    assert any(line.startswith("| gpu_check |") and line.endswith("| NVIDIA H200, 16 CPUs |") for line in md)
    assert any(line.startswith("| a |") and line.endswith("| 2 CPUs |") for line in md)


def test_a_cuda_benchmark_is_left_out_without_cuda_and_keeps_its_figures(tmp_path, monkeypatch):
    scripts = {"good": fake_benchmark(tmp_path, "good", "Recorder('good', {}).figure('g', 2.0, 's')"),
               "gpu_check": fake_benchmark(tmp_path, "gpu_check", "Recorder('gpu_check', {}).figure('h', 1.0, 's')")}
    monkeypatch.setattr(_collect, "discover", lambda: scripts)
    out, md = tmp_path / "results.json", tmp_path / "RESULTS.md"

    def collect(cuda, *flags):
        monkeypatch.setattr(_collect, "machine_info", lambda: {"cpu_count": 1, "cuda": cuda})
        monkeypatch.setattr(sys, "argv", ["_collect.py", "--out", str(out), "--md", str(md), *flags])
        assert _collect.main() == 0
        res = json.loads(out.read_text())
        return {r["name"]: r.get("kept_from_run") is None for r in res["runs"]}, [f["name"] for f in res["figures"]]

    assert collect("NVIDIA H200") == ({"good": True, "gpu_check": True}, ["g", "h"])  # a GPU machine: all
    assert collect(None) == ({"good": True, "gpu_check": False}, ["g", "h"])  # no CUDA: left out, figures kept
    assert collect(None, "--only", "gpu_check") == ({"good": False, "gpu_check": True}, ["g", "h"])
    quick = tmp_path / "quick.json"
    monkeypatch.setattr(_collect, "machine_info", lambda: {"cpu_count": 1, "cuda": None})
    monkeypatch.setattr(sys, "argv", ["_collect.py", "--quick", "--out", str(quick), "--md", str(md)])
    assert _collect.main() == 0  # --quick runs it on the CPU
    assert [r["name"] for r in json.loads(quick.read_text())["runs"]] == ["good", "gpu_check"]
