"""Load on the CLL scoring API over loopback: requests/s and p50/p99 latency at 1, 4 and 16
concurrent clients, with and without batching (concurrent requests sharing forward passes).

    .venv/bin/python benchmarks/serve_load.py                       # the embedded model, 2 CPUs
    .venv/bin/python benchmarks/serve_load.py --rounds 8 --clients 1 4 16 32

Each client sends `--rounds` requests of one item each (a short prompt + a ~25-token
response), one after the other; the figures count only those timed requests (a warm-up
request per setting is not counted). Goal: batching at least 2x the unbatched throughput
at 16 clients. Bounded: clients x rounds requests per setting.

First it measures the ceiling of batching on this machine without HTTP or Ray: in-process
scoring seconds per row, one row per call against `max(clients)` rows per call. On the 2-core
CPU a 40-token forward pass already keeps the matmul units busy, so this ceiling is below 2x;
on a GPU a single short sequence uses a sliver of the device and the ceiling is far higher.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time

from _results import Recorder

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["river", "mountain", "library", "engine", "garden", "planet", "violin", "harbour", "desert", "forest"]


def item(k: int) -> dict:
    a, b = WORDS[k % len(WORDS)], WORDS[(k * 7 + 3) % len(WORDS)]
    return {"prompt": f"Describe a {a} in one sentence.",
            "response": f"A {a} is a place where the {b} meets the sky, quiet in the morning and loud by night {k}."}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, clients: int, rounds: int) -> tuple[float, list[float], int]:
    import httpx

    latencies: list[float] = []
    failures = 0

    async def client(cid: int) -> None:
        nonlocal failures
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for r in range(rounds):
                start = time.perf_counter()
                resp = await http.post("/v1/score", json={"items": [item(cid * rounds + r)]})
                latencies.append(time.perf_counter() - start)
                failures += resp.status_code != 200

    async with __import__("httpx").AsyncClient(base_url=url, timeout=600) as http:  # warm-up
        await http.post("/v1/score", json={"items": [item(10_000)]})
    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - start, latencies, failures


def compute_ceiling(model: str | None, clients: int, threads: int) -> tuple[float, float]:
    """Seconds per row of in-process scoring (no HTTP, no Ray): one row per call, and `clients`
    rows per call. Their ratio bounds what batching can gain on this machine: merging requests
    saves forward-pass overhead only as far as a bigger batch runs faster per row."""
    import torch
    from _baselines import seconds_per_row
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows

    torch.set_num_threads(threads)
    engine = HFEngine(model, device="cpu")
    per_row = seconds_per_row(lambda rows: score_rows(rows, engine), [item(k) for k in range(clients)], (1, clients))
    return per_row[1], per_row[clients]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=4, help="requests per client per setting")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--batch-requests", type=int, default=16, help="max requests per merged scoring call")
    args = parser.parse_args()

    import ray
    from opsft.config import ServeConfig
    from opsft.serve.app import build_app
    from ray import serve

    top = max(args.clients)
    single, batched = compute_ceiling(args.model, top, args.num_cpus)
    print(f"in-process scoring, no HTTP: {single * 1000:.0f} ms per row one at a time, {batched * 1000:.0f} ms per "
          f"row {top} at a time -> batching can gain at most {single / batched:.2f}x here")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print(f"model={args.model or 'embedded SmolLM2-135M-Instruct'} cpus={args.num_cpus} rounds={args.rounds} "
          f"(requests of 1 item, ~40 tokens each)")
    print(f"{'batching':>9} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}")
    rates: dict[tuple[bool, int], float] = {}
    p99: dict[tuple[bool, int], float] = {}
    try:
        for batching in (False, True):
            cfg = ServeConfig(engine={"model": args.model}, num_cpus=args.num_cpus, batching=batching,
                              max_batch_requests=args.batch_requests, max_ongoing_requests=256,
                              allow_open=True)  # loopback only
            serve.run(build_app(cfg), name="bench", route_prefix="/bench")
            for clients in args.clients:
                seconds, lat, failed = asyncio.run(load(f"http://127.0.0.1:{port}/bench", clients, args.rounds))
                rate = len(lat) / seconds
                rates[(batching, clients)] = rate
                p99[(batching, clients)] = percentile(lat, 0.99) * 1000
                print(f"{'on' if batching else 'off':>9} {clients:>7} {len(lat):>8} {rate:>7.2f} "
                      f"{statistics.median(lat) * 1000:>8.0f} {percentile(lat, 0.99) * 1000:>8.0f} {failed:>6}",
                      flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    ratio = rates[(True, top)] / rates[(False, top)]
    print(f"throughput with batching / without at {top} clients: {ratio:.2f}x (goal >= 2x)")
    rec = Recorder("serve_load", args)
    for clients in args.clients:
        goal = (">=", 2.0, "serve_load.py docstring: batching >= 2x unbatched at 16 clients") if clients == 16 else None
        rec.figure(f"throughput, batching on, {clients} client{'s' * (clients != 1)}", rates[(True, clients)], "req/s",
                   baseline=("batching off", rates[(False, clients)]), goal=goal)
    rec.figure(f"p99 latency, batching on, {top} clients", p99[(True, top)], "ms",
               baseline=("batching off", p99[(False, top)]))
    rec.figure(f"in-process scoring rows/s, {top} rows per call (the ceiling of batching)", 1 / batched, "rows/s",
               baseline=("1 row per call", 1 / single),
               note="no HTTP, no Ray: the most batching can gain from the forward pass on this machine")


if __name__ == "__main__":
    main()
