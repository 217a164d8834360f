"""Realignment building blocks without a model: selection, merging, fingerprints, the lock."""

import os
import signal
import subprocess
import sys
import time

import pytest
from opsft.realign.cycle import corpus_fingerprint, drift_rule, merge_corpus, model_fingerprint, select_drifted
from opsft.realign.lock import LockedError, OutputLock

ROWS = [{"id": "a", "cll": -0.9}, {"id": "b", "cll": -0.1}, {"id": "c", "cll": -0.5},
        {"id": "d", "cll": -0.5}, {"id": "e", "cll": None, "error": "bad row"}, {"id": "f", "cll": 0.2}]


def test_threshold_selects_rows_below_it_and_never_error_rows():
    assert select_drifted(ROWS, "threshold", -0.3) == {"a", "c", "d"}
    assert select_drifted(ROWS, "threshold", -5.0) == set()


def test_quantile_selects_the_lowest_fraction_with_deterministic_ties():
    # 5 scored rows; 40% -> 2 rows: the lowest (a) and, of the tie at -0.5, the smaller id (c).
    assert select_drifted(ROWS, "quantile", 0.4) == {"a", "c"}
    assert select_drifted(ROWS, "quantile", 1.0) == {"a", "b", "c", "d", "f"}
    assert select_drifted(ROWS, "quantile", 0.0) == set()
    with pytest.raises(ValueError):
        select_drifted(ROWS, "quantile", 1.5)
    with pytest.raises(ValueError):
        select_drifted(ROWS, "bottom", 0.5)


def test_merge_streams_kept_then_rewritten_rows_and_drops_old_scores():
    kept = iter([{"id": "2", "prompt": "q2", "response": "r2", "cll": -0.1, "meta": 2},
                 {"id": "3", "prompt": None, "response": "r3", "cll": None, "error": "no prompt"},
                 {"id": "4", "prompt": "q4", "response": "r4", "cll": -0.2, "source": "hinted"}])
    rewritten = iter([{"id": "1", "prompt": "q1", "response": "new", "original_response": "r1", "source": "hinted",
                       "cll": -0.2, "meta": 1},
                      {"id": "5", "prompt": "q5", "response": "r5", "source": "original", "error": "too long"}])
    out = list(merge_corpus(kept, rewritten))
    assert [r["id"] for r in out] == ["2", "3", "4", "1", "5"]
    assert out[0] == {"id": "2", "prompt": "q2", "response": "r2", "meta": 2, "source": "kept", "rewritten": False}
    assert out[1]["error"] == "no prompt" and out[1]["source"] == "kept"
    assert out[2]["source"] == "hinted"  # a kept row keeps the source an earlier cycle gave it
    assert out[3] == {"id": "1", "prompt": "q1", "response": "new", "original_response": "r1", "source": "hinted",
                      "meta": 1, "rewritten": True}
    assert out[4]["error"] == "too long"


def test_quantile_rule_on_a_stream_equals_sorting_everything():
    import random

    rnd = random.Random(0)
    rows = [{"id": f"r{i}", "cll": round(rnd.uniform(-2, 0), 1)} for i in range(300)]
    rows += [{"id": "nan", "cll": float("nan")}, {"id": "err", "cll": -9.0, "error": "x"}, {"id": "none", "cll": None}]
    valid = sorted((r["cll"], r["id"]) for r in rows[:300])
    for q in (0.0, 0.01, 0.1, 0.37, 1.0):
        want = {rid for _, rid in valid[: int(round(q * 300))]}
        assert select_drifted(rows, "quantile", q) == want
    passes = []
    rule = drift_rule(lambda: passes.append(1) or iter(rows), "quantile", 0.2)
    assert len(passes) == 2 and sum(map(rule, rows)) == 60


def test_fingerprints_change_with_content(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "q", "response": "a"}\n')
    first = corpus_fingerprint(str(corpus))
    assert corpus_fingerprint(str(corpus)) == first
    corpus.write_text('{"prompt": "q", "response": "b"}\n')
    assert corpus_fingerprint(str(corpus)) != first
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 100)
    fp = model_fingerprint(str(model))
    (model / "model.safetensors").write_bytes(b"\1" * 100)
    assert model_fingerprint(str(model)) != fp


def test_second_holder_is_refused_with_who_holds_it(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path).acquire()
        start = time.monotonic()
        with pytest.raises(LockedError):
            OutputLock(tmp_path, wait=True, poll_s=0.05, timeout_s=0.3).acquire()
        assert time.monotonic() - start >= 0.3
    with OutputLock(tmp_path):  # released on exit
        pass


HOLDER = """
import sys, time
from opsft.realign.lock import OutputLock
held = OutputLock(sys.argv[1]).acquire()  # keep a reference: the handle holds the lock
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_of_a_killed_process_is_recovered(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=f"pid {child.pid}"):
        OutputLock(tmp_path).acquire()
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    lock = OutputLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


def test_merge_keeps_rows_dropped_by_the_rewrite_out_of_the_corpus_but_not_lost(tmp_path):
    from opsft.data.corpus import write_rows
    from opsft.data.reader import read_rows
    from opsft.realign.cycle import run_merge

    write_rows([{"id": str(i), "prompt": f"q{i}", "response": f"r{i}", "cll": -1.0} for i in (0, 3)],
               tmp_path / "kept.parquet")
    write_rows([{"id": "1", "prompt": "q1", "response": "new", "source": "hd", "verified": True, "dropped": False},
                {"id": "2", "prompt": "q2", "response": "r2", "source": "original", "verified": False,
                 "dropped": True}], tmp_path / "rewritten.parquet")
    out = run_merge(None, tmp_path, {"data": str(tmp_path)})
    corpus, dropped = read_rows(tmp_path / "corpus.parquet"), read_rows(tmp_path / "dropped.parquet")
    assert [r["id"] for r in corpus] == ["0", "3", "1"] and [r["id"] for r in dropped] == ["2"]
    assert corpus[2]["response"] == "new" and out["rows"] == 3 and out["dropped"] == 1
    assert out["sources"] == {"kept": 2, "hd": 1} and "cll" not in corpus[0]


def test_a_cycle_with_an_engine_that_cannot_rewrite_is_refused_before_it_starts(monkeypatch):
    from opsft.config import RealignConfig
    from opsft.engines import base
    from opsft.realign.cycle import Cycle

    # building a cycle runs nothing: the check comes first
    Cycle(RealignConfig(corpus="c.jsonl", output_dir="out", engine={"kind": "vllm"}))  # vllm does every stage
    # an engine kind without the decode capability (as vllm was before opsft.engines.vllm_hd)
    monkeypatch.setitem(base.CAPABILITIES, "vllm", frozenset({"score", "generate"}))
    with pytest.raises(ValueError, match="stage hinted-decoding needs an engine that can decode; engine 'vllm'"):
        Cycle(RealignConfig(corpus="c.jsonl", output_dir="out", engine={"kind": "vllm"}))
    # generation and scoring on vLLM, hinted decoding on hf: accepted
    Cycle(RealignConfig(corpus="c.jsonl", output_dir="out", engine={"kind": "vllm"},
                        rewrite={"stages": {"hinted-decoding": {"engine": {"kind": "hf"}}}}))
