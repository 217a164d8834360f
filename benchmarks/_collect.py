"""Run every benchmark in benchmarks/ and write benchmarks/results.json and benchmarks/RESULTS.md.

    make bench                                  # all of them, at their default settings
    make bench BENCH=score_throughput           # one (or several: BENCH="train_step serve_load")
    make bench QUICK=1                          # tiny settings, to check the plumbing (minutes)
    .venv/bin/python benchmarks/_collect.py --render benchmarks/results.json   # RESULTS.md only

Each benchmark (every benchmarks/*.py whose name does not start with _) runs in its own
process with OPSFT_BENCH_OUT pointing at a scratch file, where its Recorder appends its
headline figures (benchmarks/_results.py); its output streams through as it runs. A benchmark
that fails is recorded (name, exit code, tail of stderr) and the others still run and keep
their figures; the collector then exits non-zero. Running a subset keeps the other
benchmarks' figures from the previous file (same settings only), marked with that run's time.
--quick runs write results-quick.json / RESULTS-quick.md (not committed), never the real files.
A benchmark of a CUDA device (NEEDS_CUDA: gpu_check) is left out of a full run where there is
none, so its figures from the GPU machine are kept; there, `--only gpu_check` adds them. Every
run record names the machine it ran on (its GPU, if any), shown in the Runs table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _results import OUT_ENV  # noqa: E402

# The smallest settings of each benchmark: they check that it runs and records, nothing more.
QUICK_ARGS = {
    "score_throughput": ["--rows", "2", "--tokens", "32"],
    "hinted_throughput": ["--items", "2", "--new-tokens", "4", "--ref-items", "1", "--ref-tokens", "2",
                          "--threads", "1", "--prefill-rows", "2"],
    "train_step": ["--batch", "1", "--seq", "32", "--steps", "1"],
    "serve_load": ["--clients", "1", "2", "--rounds", "1"],
    "data_jobs": ["--rows", "4", "--no-vllm"],
    "gpu_check": ["--quick"],
    "bf16_scoring": ["--rows", "2"],
    "engine_occupancy": ["--rows", "4", "--batch", "2", "--calls", "1", "2", "--new-tokens", "4"],
    "reliability": ["--clients", "4", "--seconds", "9"],
    "fused_loss": ["--rows", "1", "--tokens", "32"],
    "score_cli": ["--rows", "2", "--repeats", "1"],
    "hinted_vllm": ["--items", "2", "--new-tokens", "4", "--vllm-items", "2"],
    "train_data": ["--rows", "200"],
    "scale_rehearsal": ["--quick"],
}
# The settings of a full run where they are not the script's defaults: the rehearsal at three sizes, so
# that its figures show the driver's memory against the rows (issue 26).
FULL_ARGS = {"scale_rehearsal": ["--rows", "100000", "300000", "1000000"],
             "engine_occupancy": ["--rows", "256", "--batch", "64", "--calls", "1", "4", "--new-tokens", "32"],
             "bf16_scoring": ["--vllm"]}
# Benchmarks that measure a CUDA device: left out of a full run on a machine without one (their
# --quick mode runs on the CPU, so QUICK=1 keeps them); `--only NAME` runs them anyway.
NEEDS_CUDA = {"gpu_check"}
STDERR_TAIL_LINES = 40


def discover() -> dict[str, Path]:
    return {p.stem: p for p in sorted(HERE.glob("*.py")) if not p.name.startswith("_")}


def machine_info() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        info.update(torch=None, torch_threads=None, cuda=None)
    return info


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_one(name: str, cmd: list[str], out_file: Path) -> dict:
    """Run one benchmark, streaming its output; its run record (exit code, seconds, stderr tail)."""
    env = {**os.environ, OUT_ENV: str(out_file)}
    started, load = now_iso(), [round(x, 2) for x in os.getloadavg()]
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace")

    def pump(src, dst, keep):
        for line in src:
            dst.write(line)
            dst.flush()
            if keep is not None:
                keep.append(line)

    pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout, None)),
             threading.Thread(target=pump, args=(proc.stderr, sys.stderr, tail))]
    for t in pumps:
        t.start()
    code = proc.wait()
    for t in pumps:
        t.join()
    return {"name": name, "command": " ".join(["python", *cmd[1:]]), "exit_code": code, "started": started,
            "seconds": round(time.monotonic() - start, 1), "load_average_start": load,
            "stderr_tail": "".join(tail)[-4000:] if code else None}


def run_benchmarks(scripts: dict[str, Path], quick: bool = False) -> tuple[list[dict], list[dict]]:
    """Run each script in turn, whatever the others did; (run records, recorded figures)."""
    runs, figures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, script in scripts.items():
            shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
            cmd = [sys.executable, str(shown), *(QUICK_ARGS.get(name, []) if quick else FULL_ARGS.get(name, []))]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            scratch = Path(tmp) / f"{name}.jsonl"
            runs.append(run_one(name, cmd, scratch))
            figures += read_figures(scratch)
            print(f"== {name}: exit {runs[-1]['exit_code']} in {runs[-1]['seconds']} s", flush=True)
    return runs, figures


def read_figures(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assemble(runs: list[dict], figures: list[dict], machine: dict, settings: str, generated: str,
             previous: dict | None = None) -> dict:
    """The results document. A run that exited non-zero, or exited 0 without recording a figure,
    is a failure. Benchmarks not run this time keep their figures and runs from `previous`
    (when it was made with the same settings)."""
    runs = [dict(r, machine=r.get("machine") or machine) for r in runs]
    failures = []
    for run in runs:
        if run["exit_code"] != 0:
            failures.append({"benchmark": run["name"], "exit_code": run["exit_code"],
                             "stderr_tail": run["stderr_tail"]})
        elif not any(f["benchmark"] == run["name"] for f in figures):
            failures.append({"benchmark": run["name"], "exit_code": 0,
                             "stderr_tail": "exited 0 but recorded no figure (is it using benchmarks/_results.py?)"})
    ran = {r["name"] for r in runs}
    if previous and previous.get("settings") == settings:
        kept = [dict(r, kept_from_run=r.get("kept_from_run") or previous["generated"],
                     machine=r.get("machine") or previous.get("machine"))
                for r in previous.get("runs", []) if r["name"] not in ran]
        runs = kept + runs
        figures = [f for f in previous.get("figures", []) if f["benchmark"] not in ran] + figures
        failures = [f for f in previous.get("failures", []) if f["benchmark"] not in ran] + failures
    order = {r["name"]: i for i, r in enumerate(sorted(runs, key=lambda r: r["name"]))}
    runs = sorted(runs, key=lambda r: order[r["name"]])
    figures = sorted(figures, key=lambda f: order.get(f["benchmark"], len(order)))  # stable within one
    failures = sorted(failures, key=lambda f: order.get(f["benchmark"], len(order)))
    return {"generated": generated, "settings": settings, "machine": machine, "runs": runs,
            "figures": figures, "failures": failures}


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def machine_label(machine: dict | None) -> str:
    """A run's machine in a few words: its GPU, or its CPU count."""
    if not machine:
        return ""
    return cell(f"{machine['cuda']}, " if machine.get("cuda") else "") + f"{machine.get('cpu_count')} CPUs"


def render_markdown(results: dict, json_name: str = "results.json") -> str:
    """RESULTS.md from a results document (json_name: the file it links to, beside it)."""
    m = results["machine"]
    load = " / ".join(str(x) for x in m.get("load_average") or [])
    kept = [r["name"] for r in results["runs"] if r.get("kept_from_run")]
    out = [
        "# Benchmark results",
        "",
        f"Generated {results['generated']} by `make bench` from [{json_name}]({json_name}) "
        f"(settings: **{results['settings']}**). Machine: {m.get('cpu_count')} CPUs, {m.get('platform')}, "
        f"Python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} threads)"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "") + f"; load average at start {load}.",
        "",
        "Ratio = value / baseline; a goal is set on the ratio (where an issue or a doc sets one).",
        "",
        *([f"Kept from an earlier run (see Runs for when): {', '.join(kept)}.", ""] if kept else []),
        *(["**Quick settings: a plumbing check of `make bench`, not figures to quote.**", ""]
          if results["settings"] == "quick" else []),
        "| benchmark | figure | value | unit | baseline | ratio | goal | met? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for f in results["figures"]:
        base = f"{cell(f['baseline']['name'])}: {fmt(f['baseline']['value'])}" if f.get("baseline") else ""
        ratio = f"{fmt(f['ratio'])}x" if f.get("ratio") is not None else ""
        goal = f"{f['goal']['op']} {fmt(f['goal']['ratio'])}x" if f.get("goal") else ""
        met = {True: "yes", False: "**no**", None: ""}[f.get("met")]
        name = cell(f["name"])
        if f.get("note"):
            if f["note"] not in notes:
                notes.append(f["note"])
            name += f" [{notes.index(f['note']) + 1}]"
        out.append(f"| {f['benchmark']} | {name} | {fmt(f['value'])} | {cell(f['unit'])} | {base} | {ratio} | {goal} "
                   f"| {met} |")
    if notes:
        out += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    goals = sorted({(f["goal"]["op"], f["goal"]["ratio"], f["goal"]["source"]) for f in results["figures"]
                    if f.get("goal")})
    if goals:
        out += ["", "Goals from: " + "; ".join(f"{op} {fmt(r)}x ({src})" for op, r, src in goals) + "."]
    if results["failures"]:
        out += ["", "## Failures", ""]
        for fail in results["failures"]:
            out += [f"- **{fail['benchmark']}** exited {fail['exit_code']}; end of its stderr:", "",
                    "```", (fail.get("stderr_tail") or "").rstrip(), "```", ""]
    out += ["", "## Runs", "", "| benchmark | command | seconds | exit | load average at start | run at | machine |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        when = r["started"] + (" (kept from an earlier `make bench`)" if r.get("kept_from_run") else "")
        out.append(f"| {r['name']} | `{r['command']}` | {r['seconds']} | {r['exit_code']} | "
                   f"{' / '.join(map(str, r['load_average_start']))} | {when} | "
                   f"{machine_label(r.get('machine') or m)} |")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=[], help="benchmark names (comma- or space-separated)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a plumbing check, not figures")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results.json, -quick with --quick)")
    p.add_argument("--md", type=Path, help="markdown table (default benchmarks/RESULTS.md, -quick with --quick)")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only write the markdown from this file")
    args = p.parse_args()
    suffix = "-quick" if args.quick else ""
    out = args.out or HERE / f"results{suffix}.json"
    md = args.md or HERE / f"RESULTS{suffix}.md"
    if args.render:
        results = json.loads(args.render.read_text())
        quick = "-quick" if results.get("settings") == "quick" else ""
        md = args.md or args.render.parent / f"RESULTS{quick}.md"
        md.write_text(render_markdown(results, args.render.name))
        print(f"wrote {md}")
        return 0

    available = discover()
    generated, machine = now_iso(), machine_info()
    names = [n for item in args.only for n in item.replace(",", " ").split()]
    if not names:
        names = [n for n in available if n not in NEEDS_CUDA or machine.get("cuda") or args.quick]
        for n in sorted(set(available) - set(names)):
            print(f"== {n}: left out, no CUDA device here (on a GPU machine: --only {n}; its figures are kept)")
    unknown = [n for n in names if n not in available]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}")
    settings = "quick" if args.quick else "default"
    runs, figures = run_benchmarks({n: available[n] for n in names}, args.quick)
    previous = json.loads(out.read_text()) if out.exists() and set(names) != set(available) else None
    results = assemble(runs, figures, machine, settings, generated, previous)
    out.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(render_markdown(results, out.name))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and {md.name}: "
          f"{len(results['figures'])} figures, {len(results['failures'])} failure(s)")
    failed = [f for f in results["failures"] if f["benchmark"] in names]  # this run's, not kept ones
    for fail in failed:
        print(f"FAILED: {fail['benchmark']} (exit {fail['exit_code']})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
