"""The scale rehearsal's quick mode (benchmarks/scale_rehearsal.py --quick): one realignment cycle of
3,000 rows on the fake engine, in its own process with its own local Ray, with three engine deaths
and one actor kill injected over the jobs. What it must show at any size (the full runs of
`make bench` show it at 100k, 300k and 1M rows): no row lost, exactly the injected bad rows as error
rows, every injected fault retried (engine faults recorded, batches tried again), every stage run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_rehearsal_loses_no_row_and_retries_every_injected_fault(tmp_path):
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_rehearsal.py"), "--quick",
                           "--workdir", str(tmp_path), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [r] = json.loads(out.read_text())
    assert r["rows"] == r["rows_in"] == r["rows_out"] == 3000
    assert r["rows_lost"] == r["job_rows_lost"] == 0
    assert r["error_rows"] == r["bad_rows_injected"] == 10
    assert (r["deaths_injected"], r["kills_injected"]) == (3, 1)
    assert r["engine_faults"] == 3 and r["batch_retries"] >= 4  # a kill leaves no record, but its batch is retried
    assert set(r["seconds"]) == {"setup", "score", "select", "rewrite", "merge", "train", "rescore", "report"}
    assert r["parts"]["score"] == 6  # 3,000 rows in parts of at least 500
    assert r["selected"] == 748 and sum(r["sources"].values()) == 3000  # a quarter of the 2,990 scored rows
    assert "rows 3,000: in 3,000, out 3,000, lost 0" in proc.stdout
