"""A scale rehearsal of the realignment cycle: everything real but the model.

    .venv/bin/python benchmarks/scale_rehearsal.py                          # 1,000,000 rows
    .venv/bin/python benchmarks/scale_rehearsal.py --rows 100000 300000 1000000
    .venv/bin/python benchmarks/scale_rehearsal.py --quick                  # 3,000 rows: a plumbing check

For each size, in a fresh process (so that each one's driver peak RSS is its own): a synthetic
corpus of simple sums with off-policy references (JSONL, streamed to disk), with `--bad-rows`
hostile lines among them (not JSON, not UTF-8, an empty response, a prompt that is a number, a lone
surrogate); then one realignment cycle (opsft.realign.cycle, local Ray) with the fake engine
(opsft.engines.fake: deterministic scores and answers, the embedded model's tokenizer, no weights)
behind the same engine factory, actor pools and jobs as a real run: score -> select (the lowest
quarter) -> rewrite (self-answer, hint, hinted decoding, verify, score) -> merge -> train (a few
IDFT steps of a tiny random model, the corpus tokenised and sharded by Ray Data) -> rescore ->
report. Injected on the way (tickets in a shared folder, so the totals hold over every process
and restart): `--deaths` engine deaths (every call of that engine raises a CUDA error from then
on: each must be retried on a new actor, never written) and `--kills` SIGKILLs of an engine
actor's process.

Printed per size: rows in, rows out, rows lost (want 0: every input row is in the new corpus or
its dropped side), error rows (want exactly the injected bad rows), engine faults and batches
retried, parts written, the driver's peak RSS (want well under 1 GB at 1M rows, and no growth with
the rows beyond noise), and the wall time of each stage. `make bench` records them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# one of each kind of hostile line (opsft.data.corpus's rules make each an error row, never a lost one)
BAD_LINES = [b"{this is not json", b"\xff\xfe not utf-8", b'{"prompt": "What is 1 + 1?", "response": ""}',
             b'{"prompt": 7, "response": "7"}', b'{"prompt": "\\ud800", "response": "x"}']
STAGES = ("score", "select", "rewrite", "merge", "train", "rescore", "report")


def write_corpus(path: Path, rows: int, bad: int) -> int:
    """rows lines of sums with terse, off-policy references; `bad` of them hostile, spread evenly."""
    every = max(1, rows // max(bad, 1))
    written_bad = 0
    with open(path, "wb") as f:
        for i in range(rows):
            if written_bad < bad and i % every == every // 2:
                f.write(BAD_LINES[written_bad % len(BAD_LINES)] + b"\n")
                written_bad += 1
                continue
            a, b = (i * 7919) % 100, (i * 104729) % 100
            f.write(json.dumps({"id": f"r{i}", "prompt": f"What is {a} + {b}?", "answer": str(a + b),
                                "response": f"{a}+{b}: units {(a + b) % 10}, carry {(a % 10 + b % 10) // 10}. "
                                            f"The answer is {a + b}."}).encode() + b"\n")
    return written_bad


class RSS:
    """The driver's resident set size, sampled every 0.2 s, with the peak of each stage."""

    def __init__(self):
        self.current = "setup"
        self.peaks: dict[str, float] = {}
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self.stop.is_set():
            mb = self.now_mb()
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), mb)
            time.sleep(0.2)


def rehearse(rows: int, args, work: Path) -> dict:
    from opsft.config import RealignConfig
    from opsft.data.reader import count_rows
    from opsft.realign.cycle import Cycle, default_runners

    rss = RSS()
    corpus = work / "corpus.jsonl"
    start = time.monotonic()
    bad = write_corpus(corpus, rows, args.bad_rows)
    from opsft.models import default_model_dir
    from reliability import tiny_checkpoint  # a 2-layer random Llama with the embedded model's tokenizer

    model = tiny_checkpoint(str(default_model_dir()), str(work / "tiny"))
    setup_s = time.monotonic() - start
    faults = work / "faults"
    cfg = RealignConfig.model_validate({
        "corpus": str(corpus), "output_dir": str(work / "cycle"), "model": model, "rows_per_part": args.rows_per_part,
        "engine": {"kind": "fake", "model": model, "max_batch_size": 64,
                   "fake": {"dead_after": args.fault_after, "deaths": args.deaths, "kill_after": args.fault_after * 2,
                            "kills": args.kills, "fault_dir": str(faults)}},
        "pool": {"min_size": args.actors, "max_size": args.actors, "num_cpus": 0.5, "batch_size": args.batch,
                 "max_task_retries": 3},
        "select": {"mode": "quantile", "quantile": 0.25},
        "rewrite": {"max_new_tokens": 32, "hint_max_new_tokens": 32, "temperature": 0.0},
        "train": {"max_steps": args.train_steps, "global_batch_size": 8, "micro_batch_size": 4, "max_length": 128,
                  "overlong": "truncate", "lr": 1e-4, "warmup_ratio": 0.0, "checkpoint_every": 1,
                  "scaling": {"num_workers": 1, "cpus_per_worker": 1}},
    })
    runners = default_runners()

    def timed(stage):
        def run(cycle, folder, state):
            rss.current = stage
            return runners[stage](cycle, folder, state)
        return run

    result = Cycle(cfg, {s: timed(s) for s in STAGES}).run()
    rss.current = "end"
    time.sleep(0.3)
    rss.stop.set()
    out = result["outputs"]
    data = Path(result["data"])
    kept, dropped = count_rows(str(data / "corpus.parquet")), count_rows(str(data / "dropped.parquet"))
    jobs = [out["score"], out["rewrite"], out["rescore"]]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows, "bad_rows_injected": bad, "rows_in": out["score"]["rows_in"],
        "rows_out": kept + dropped, "rows_lost": rows - (kept + dropped),
        "job_rows_lost": sum(j.get("rows_lost", 0) for j in jobs),
        "error_rows": out["score"]["error_rows_total"],
        "engine_faults": sum(j.get("engine_faults", 0) for j in jobs),
        "batch_retries": sum(j.get("batch_retries", 0) for j in jobs),
        "deaths_injected": len(list(faults.glob("death-*"))), "kills_injected": len(list(faults.glob("kill-*"))),
        "parts": {name: out[name]["parts"] for name in ("score", "rewrite", "rescore")},
        "selected": out["select"]["selected"], "sources": out["merge"]["sources"],
        "driver_peak_rss_mb": round(peak, 1), "driver_peak_rss_mb_by_stage": {k: round(v, 1) for k, v in
                                                                            rss.peaks.items()},
        "seconds": {"setup": round(setup_s, 1), **{s: out[s]["seconds"] for s in STAGES}},
        "cll_before": out["report"]["cll_before"], "cll_after": out["report"]["cll_after"],
    }


def run_sizes(args) -> list[dict]:
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="opsft-rehearsal-", dir=args.workdir) as work:
            cmd = [sys.executable, __file__, "--one", str(rows), "--workdir", work, *forwarded(args)]
            print(f"== {rows:,} rows: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd)
            if proc.returncode:
                raise SystemExit(f"the rehearsal of {rows} rows failed (exit {proc.returncode})")
            results.append(json.loads((Path(work) / "result.json").read_text()))
            show(results[-1])
    return results


def forwarded(args) -> list[str]:
    return ["--bad-rows", str(args.bad_rows), "--deaths", str(args.deaths), "--kills", str(args.kills),
            "--fault-after", str(args.fault_after), "--actors", str(args.actors), "--batch", str(args.batch),
            "--rows-per-part", str(args.rows_per_part), "--train-steps", str(args.train_steps)]


def show(r: dict) -> None:
    print(f"rows {r['rows']:,}: in {r['rows_in']:,}, out {r['rows_out']:,}, lost {r['rows_lost']} (jobs: "
          f"{r['job_rows_lost']}); error rows {r['error_rows']} (injected {r['bad_rows_injected']}); engine faults "
          f"{r['engine_faults']} and batch retries {r['batch_retries']} (injected {r['deaths_injected']} deaths, "
          f"{r['kills_injected']} kills); parts {r['parts']}; driver peak RSS {r['driver_peak_rss_mb']:.0f} MB",
          flush=True)
    print("  seconds per stage: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), flush=True)
    print("  driver peak RSS per stage (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                         r["driver_peak_rss_mb_by_stage"].items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--quick", action="store_true", help="3,000 rows (a plumbing check; make test runs it)")
    parser.add_argument("--bad-rows", type=int, default=10)
    parser.add_argument("--deaths", type=int, default=3, help="engine deaths injected in all")
    parser.add_argument("--kills", type=int, default=1, help="engine actor processes SIGKILLed in all")
    parser.add_argument("--fault-after", type=int, default=20, help="an engine dies after this many calls")
    parser.add_argument("--actors", type=int, default=2, help="engine actors per stage")
    parser.add_argument("--batch", type=int, default=256, help="rows per actor call")
    parser.add_argument("--rows-per-part", type=int, default=20_000)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--workdir", help="where the corpora and outputs go (default: the system temp folder)")
    parser.add_argument("--json", help="also write each size's figures to this file (a JSON list)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process of one size
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))
    if args.one is not None:  # the child: its figures to <workdir>/result.json (Ray Data logs to stdout)
        (Path(args.workdir) / "result.json").write_text(json.dumps(rehearse(args.one, args, Path(args.workdir))))
        return
    if args.quick:
        args.rows, args.fault_after, args.batch, args.rows_per_part = [3000], 4, 64, 500
    results = run_sizes(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import Recorder

    rec = Recorder("scale_rehearsal", args)
    smallest = results[0]
    for r in results:
        n = f"{r['rows']:,} rows"
        rec.figure(f"rows lost, {n} (engine deaths and a kill injected)", r["rows_lost"] + r["job_rows_lost"], "rows",
                   note=f"rows in {r['rows_in']}, out {r['rows_out']}")
        rec.figure(f"error rows beyond the injected bad rows, {n}", r["error_rows"] - r["bad_rows_injected"], "rows",
                   note=f"{r['bad_rows_injected']} injected")
        rec.figure(f"batch retries after engine faults and actor deaths, {n}", r["batch_retries"], "retries",
                   note=f"{r['deaths_injected']} deaths and {r['kills_injected']} kills injected")
        rec.figure(f"driver peak RSS, {n}", r["driver_peak_rss_mb"], "MB",
                   baseline=(f"{smallest['rows']:,} rows", smallest["driver_peak_rss_mb"]),
                   goal=("<=", 1.25, "issue 26: flat in the rows, beyond noise") if r is not smallest else None)
        rec.figure(f"cycle wall time, {n}", sum(r["seconds"].values()), "s",
                   note=", ".join(f"{k} {v}" for k, v in r["seconds"].items()))


if __name__ == "__main__":
    main()
