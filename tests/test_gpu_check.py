"""benchmarks/gpu_check.py (the check a session with a GPU runs) cannot rot: its --quick mode runs
the same code on the CPU with a tiny random Qwen2, records every headline figure, and imports
nothing the GPU machine lacks (it has torch, transformers and numpy; no Ray, vLLM, pydantic,
reasoning-gym or pandas): the entropy calibration, the float64 reference of opsft.train.precision,
the fused head against the logits path and the FSDP2 step (gloo, world size 1) included. The
figures themselves need CUDA: see the script's docstring."""

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
    "mean next-token entropy of the calibrated model",
    "CLL scoring fp32", "CLL scoring fp32 max |dphi| vs float64",
    "float64 reference: .to(float64) against to_dtype, max |dphi|",
    "CLL scoring bf16", "CLL scoring bf16 max |dphi| vs float64",
    "hinted decoding T 0.3, batched+cached", "hinted decoding T 0.3 against plain sampling",
    "scoring rows/s, 4 rows per call (the batching ceiling)",
    "fused head forward+backward time", "fused head max |dlogp| vs float64",
    "sft training throughput", "idft training throughput", "idft step time",
    "idft FSDP2 world size 1 training throughput",
    "gpu_check wall time",
]  # on CUDA also the peak memory figures and MFU
WITH_GOALS = {"CLL scoring fp32", "CLL scoring fp32 max |dphi| vs float64", "CLL scoring bf16",
              "CLL scoring bf16 max |dphi| vs float64", "hinted decoding T 0.3, batched+cached",
              "hinted decoding T 0.3 against plain sampling", "scoring rows/s, 4 rows per call (the batching ceiling)",
              "idft step time", "gpu_check wall time"}


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
    assert {f["name"] for f in figures if f["goal"]} == WITH_GOALS
    assert all(f["baseline"]["value"] > 0 for f in figures if f["baseline"])
    fig = {f["name"]: f for f in figures}
    # the random model was scaled to the target entropy (log V = 6.9 nats unscaled) before anything ran
    entropy = fig["mean next-token entropy of the calibrated model"]
    assert abs(entropy["value"] - entropy["baseline"]["value"]) < 1e-3 and entropy["baseline"]["value"] < 3
    # opsft's scorer is exact: fp32 phi within float32 rounding of a float64 run of the same weights
    # (phi is O(10) nats; a few hundred roundings of 6e-8 relative each stay far below 1e-4)
    exact = fig["CLL scoring fp32 max |dphi| vs float64"]
    assert exact["value"] < 1e-4 and exact["baseline"]["value"] < 1e-4
    # the plain .to(float64) copy differs from to_dtype's (its norms round through float32): value > 0 above
    assert fig["float64 reference: .to(float64) against to_dtype, max |dphi|"]["value"] < 1e-4
    # the fused head is as exact as the logits path: both round the logits to bf16 (about 2^-9 of a
    # logit of a few nats), nothing more
    head = fig["fused head max |dlogp| vs float64"]
    assert head["value"] <= 1.5 * head["baseline"]["value"] + 1e-6 and head["value"] < 0.25
    fsdp = fig["idft FSDP2 world size 1 training throughput"]
    assert fsdp["baseline"]["name"].startswith("unsharded") and "gloo" in fsdp["note"]
    wall = fig["gpu_check wall time"]
    assert wall["met"] and wall["baseline"]["value"] == 480


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


def test_entropy_scale_bisects_to_the_target_and_refuses_what_cannot_be():
    import gpu_check

    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits on a busy machine
    try:
        for target in (0.5, 2.74, 6.0):
            scale = gpu_check.entropy_scale(logits, target)
            assert abs(gpu_check.mean_entropy(logits, scale) - target) < 1e-6
            assert gpu_check.entropy_scale(logits, target) == scale  # deterministic
        assert gpu_check.entropy_scale(logits, 2.0) > gpu_check.entropy_scale(logits, 4.0)  # more peaked, larger
    finally:
        torch.set_num_threads(threads)
    for target in (0.0, math.log(1000), 20.0):
        with pytest.raises(ValueError, match="target entropy"):
            gpu_check.entropy_scale(logits, target)
