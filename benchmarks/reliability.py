"""A bounded soak of the CLL scoring API: many concurrent clients on loopback for a fixed time,
while the model is reloaded (to another checkpoint and back) and a scorer replica is killed.

    .venv/bin/python benchmarks/reliability.py                          # 64 clients, 60 s, 2 replicas
    .venv/bin/python benchmarks/reliability.py --clients 16 --seconds 20

Each client sends one-item requests, one after the other, until the time is up. Events, at
fixed fractions of the run: a reload to a second checkpoint (a tiny random model, so its
answers are told apart), SIGKILL of one scorer replica's process, and a reload back to the
first model. Counted: requests sent, answers by HTTP status, transport errors, answers per
served model, and answers whose scores do not equal that model's own scores for the item
(`wrong`: a mixed-up or corrupted answer; compared at 1e-4, the float noise of batched scoring).
The run's goal is no failure and no wrong answer: a reload swaps engines while requests keep
flowing, and a request whose replica dies is sent again to a live one (opsft.serve.deployments).

Latency here is the latency of 64 clients sharing 2 CPU cores: it measures queueing, not
the model. Bounded: --seconds plus the start-up and the last requests' answers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import statistics
import tempfile
import time

from _results import Recorder

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOPICS = ["the moon", "rivers", "prime numbers", "bread", "owls", "glaciers", "chess", "tea"]
TOL = 1e-4  # batched vs one-row scoring in float32 (tests/test_serve_http.py uses the same)


def item(k: int) -> dict:
    return {"prompt": f"Write one sentence about {TOPICS[k % len(TOPICS)]}.",
            "response": f"Here is a fact about {TOPICS[k % len(TOPICS)]}: it is {k % 5} times more interesting."}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(base_model: str, folder: str) -> str:
    """A 2-layer random Llama with the base model's tokenizer: a second model to reload to."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(base_model)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def expected_cll(models: list[str]) -> dict[str, list[float]]:
    """Each model's CLL of the distinct items, scored in-process one row at a time."""
    from opsft.engines.hf import HFEngine
    from opsft.scoring import score_rows

    return {m: [r["cll"] for r in score_rows([item(k) for k in range(len(TOPICS) * 5)], HFEngine(m, device="cpu"))]
            for m in models}


def scorer_pids() -> list[int]:
    """The pids of the live Scorer replicas, from the GCS actor table (no dashboard needed)."""
    from ray._private import state  # the debugging API Ray exposes as ray.state.actors

    return [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values()
            if "Scorer" in a.get("ActorClassName", "") and a.get("Pid")]


class Soak:
    def __init__(self, url: str, expected: dict[str, list[float]]):
        self.url, self.expected = url, expected
        self.status: collections.Counter = collections.Counter()
        self.by_model: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.latency: list[float] = []
        self.failed_at: list[float] = []  # when each failed request was sent (monotonic clock)
        self.wrong = 0
        self.samples: list[str] = []  # the first few failures, for the report

    def note(self, text: str) -> None:
        if len(self.samples) < 5:
            self.samples.append(text[:300])

    async def client(self, http, cid: int, until: float) -> None:
        k = cid
        while time.monotonic() < until:
            k = (k + 7) % (len(TOPICS) * 5)
            start, sent = time.perf_counter(), time.monotonic()
            try:
                resp = await http.post("/v1/score", json={"items": [item(k)]})
            except Exception as exc:  # noqa: BLE001 - every transport failure is counted, by type
                self.errors[type(exc).__name__] += 1
                self.failed_at.append(sent)
                self.note(f"{type(exc).__name__}: {exc}")
                continue
            self.latency.append(time.perf_counter() - start)
            self.status[resp.status_code] += 1
            if resp.status_code != 200:
                self.failed_at.append(sent)
                self.note(f"{resp.status_code}: {resp.text}")
                continue
            body = resp.json()
            model = body["model"]
            self.by_model[model] += 1
            want = self.expected.get(model)
            if want is None or abs(body["results"][0]["cll"] - want[k]) > TOL:
                self.wrong += 1
                self.note(f"wrong answer from {model}: {body['results'][0]['cll']} vs {want and want[k]}")


async def reload(http, model: str) -> tuple[int, float, float]:
    start = time.monotonic()
    resp = await http.post("/v1/models/reload", json={"model": model})
    return resp.status_code, start, time.monotonic()


async def soak(url: str, args, models: list[str], expected) -> tuple[Soak, list[tuple[str, float, float]], float]:
    """The run; its events as (what, start, end) on the monotonic clock, and its wall time."""
    import httpx

    result, events = Soak(url, expected), []
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await http.post("/v1/score", json={"items": [item(0)]})  # warm-up, not counted
        start = time.monotonic()
        until = start + args.seconds
        clients = [asyncio.create_task(result.client(http, c, until)) for c in range(args.clients)]

        async def at(frac: float) -> None:
            await asyncio.sleep(max(0.0, start + frac * args.seconds - time.monotonic()))

        await at(1 / 3)
        code, t0, t1 = await reload(http, models[1])
        events.append((f"reload to the tiny checkpoint (HTTP {code})", t0, t1))
        if args.kill:
            await at(1 / 2)
            pids = await asyncio.to_thread(scorer_pids)
            t0 = time.monotonic()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
            # the window that counts: from the kill until the replica is back (or the run ends)
            while time.monotonic() < until:
                now = await asyncio.to_thread(scorer_pids)
                if pids and pids[0] not in now and len(now) >= args.replicas:
                    break
                await asyncio.sleep(0.5)
            events.append((f"SIGKILL of scorer replica pid {pids[0] if pids else '(none found)'} until its "
                           "replacement is up", t0, time.monotonic()))
        await at(2 / 3)
        code, t0, t1 = await reload(http, models[0])
        events.append((f"reload back to the first model (HTTP {code})", t0, t1))
        await asyncio.gather(*clients)
        for k, (what, t0, t1) in enumerate(events):
            events[k] = (what, t0 - start, t1 - start)
        result.failed_at = [t - start for t in result.failed_at]
        return result, events, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-kill", dest="kill", action="store_false", help="do not kill a replica")
    args = parser.parse_args()

    import ray
    from opsft.config import ServeConfig
    from opsft.models import default_model_dir
    from opsft.serve.app import build_app
    from ray import serve

    first = args.model or str(default_model_dir())
    with tempfile.TemporaryDirectory(prefix="opsft-soak-") as tmp:
        models = [first, tiny_checkpoint(first, tmp)]
        expected = expected_cll(models)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            cfg = ServeConfig(engine={"model": first}, num_replicas=args.replicas,
                              num_cpus=args.num_cpus / args.replicas, max_ongoing_requests=256,
                              allow_open=True)  # loopback only
            serve.run(build_app(cfg), name="soak", route_prefix="/soak")
            print(f"soak: {args.clients} clients for {args.seconds:.0f} s, {args.replicas} scorer replicas on "
                  f"{args.num_cpus} CPUs, one-item requests", flush=True)
            result, events, wall = asyncio.run(soak(f"http://127.0.0.1:{port}/soak", args, models, expected))
        finally:
            serve.shutdown()
            ray.shutdown()

    answered = sum(result.status.values())
    sent = answered + sum(result.errors.values())
    failed = sent - result.status[200]
    names = {models[0]: "first model", models[1]: "tiny checkpoint"}
    for what, t0, t1 in events:
        during = sum(t0 <= t <= t1 for t in result.failed_at)
        print(f"  t={t0:5.1f}-{t1:5.1f} s {what}: {during} requests sent in that window failed")
    codes = {"4xx": sum(v for k, v in result.status.items() if 400 <= k < 500),
             "5xx": sum(v for k, v in result.status.items() if k >= 500)}
    print(f"requests sent {sent}, answered 200: {result.status[200]}, 4xx: {codes['4xx']}, 5xx: {codes['5xx']}, "
          f"transport errors: {dict(result.errors) or 'none'}, wrong answers: {result.wrong}")
    print("answers by model: " + ", ".join(f"{names.get(m, m)} {n}" for m, n in result.by_model.items()))
    print(f"throughput {answered / wall:.1f} req/s over {wall:.1f} s; latency p50 "
          f"{statistics.median(result.latency) * 1000:.0f} ms, p99 {percentile(result.latency, 0.99) * 1000:.0f} ms, "
          f"max {max(result.latency) * 1000:.0f} ms")
    for sample in result.samples:
        print("  failure: " + sample)
    rec = Recorder("reliability", args)
    reloads = [(t0, t1) for what, t0, t1 in events if what.startswith("reload")]
    rec.figure("requests failed that were sent while a reload ran", sum(any(t0 <= t <= t1 for t0, t1 in reloads)
                                                                          for t in result.failed_at), "requests",
               goal=("<=", 0, "issue 13: failed during reload (want 0)"))
    rec.figure(f"failed requests, {args.clients} clients for {args.seconds:.0f} s with 2 reloads"
               f"{' and a replica killed' if args.kill else ''}", failed, "requests",
               goal=("<=", 0, "issue 13: no request fails during a reload or a replica's death"),
               note=f"{sent} requests sent")
    rec.figure("wrong answers (scores not equal to the named model's own)", result.wrong, "answers",
               goal=("<=", 0, "an answer always comes from the model it names"))
    rec.figure(f"p99 latency, {args.clients} clients on {args.num_cpus} CPUs", percentile(result.latency, 0.99) * 1000,
               "ms", note="queueing of many clients on 2 cores, not the model's speed")


if __name__ == "__main__":
    main()
