"""benchmarks/gpu_check.py (the check a session with a GPU runs) cannot rot: its --quick mode runs
the same code on the CPU with a tiny random Qwen2, records every headline figure, and imports
nothing the GPU machine lacks (it has torch, transformers and numpy; no Ray, vLLM, pydantic,
reasoning-gym or pandas). The figures themselves need CUDA: see the script's docstring."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from _results import OUT_ENV  # noqa: E402

NOT_ON_THE_GPU_MACHINE = {"ray", "vllm", "fastapi", "starlette", "uvicorn", "pydantic", "reasoning_gym", "pandas",
                          "pyarrow", "datasets"}
FIGURES = [
    "CLL scoring fp32", "CLL scoring fp32 max |dphi| vs float64",
    "CLL scoring bf16", "CLL scoring bf16 max |dphi| vs float64",
    "hinted decoding T 0.3, batched+cached", "hinted decoding T 0.3 against plain sampling",
    "scoring rows/s, 4 rows per call (the batching ceiling)",
    "sft training throughput", "idft training throughput", "idft step time",
]  # on CUDA also the peak memory figures and MFU


def test_quick_mode_runs_records_and_imports_only_what_the_gpu_machine_has(tmp_path):
    out = tmp_path / "figures.jsonl"
    code = (
        "import json, runpy, sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "sys.argv = ['gpu_check.py', '--quick']\n"
        "try:\n"
        f"    runpy.run_path({str(BENCH / 'gpu_check.py')!r}, run_name='__main__')\n"
        "    code = 0\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('MODULES ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, OUT_ENV: str(out)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = set(json.loads(proc.stdout.rsplit("MODULES ", 1)[1]))
    assert {"torch", "transformers", "opsft"} <= modules
    assert not modules & NOT_ON_THE_GPU_MACHINE, sorted(modules & NOT_ON_THE_GPU_MACHINE)

    figures = [json.loads(line) for line in out.read_text().splitlines()]
    assert [f["name"] for f in figures] == FIGURES
    for f in figures:
        assert f["benchmark"] == "gpu_check" and f["settings"]["device"] == "cpu" and f["settings"]["quick"]
        assert math.isfinite(f["value"]) and f["value"] > 0, f
    speeds = [f for f in figures if f["baseline"] and "/s" in f["unit"]]
    assert len(speeds) == 5 and all(f["baseline"]["value"] > 0 and f["goal"] for f in speeds)
    # opsft's scorer is exact: fp32 phi within float32 rounding of a float64 run of the same weights
    # (phi is O(10) nats; a few hundred roundings of 6e-8 relative each stay far below 1e-4)
    exact = next(f for f in figures if f["name"] == "CLL scoring fp32 max |dphi| vs float64")
    assert exact["value"] < 1e-4 and exact["baseline"]["value"] < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_quick_it_needs_cuda(capsys):
    import gpu_check

    assert gpu_check.main([]) == 2
    assert "--quick" in capsys.readouterr().err


def test_a_failing_section_costs_only_its_own_figures(tmp_path, monkeypatch, capsys):
    """One run on a lent GPU is all there is: a section that breaks is reported and the rest still record."""
    import gpu_check

    def broken(*args):
        raise RuntimeError("no such kernel")

    out = tmp_path / "figures.jsonl"
    monkeypatch.setenv(OUT_ENV, str(out))
    monkeypatch.setattr(gpu_check, "check_hinted", broken)
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--quick"]) == 1
    finally:
        torch.set_num_threads(threads)
    names = [json.loads(line)["name"] for line in out.read_text().splitlines()]
    assert names == [n for n in FIGURES if not n.startswith("hinted decoding")]
    captured = capsys.readouterr()
    assert "RuntimeError: no such kernel" in captured.err and "FAILED: ['2. hinted decoding']" in captured.out
