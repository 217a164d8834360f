"""The vLLM generate runner's Feeder (opsft.engines.vllm.Feeder) on a simulated engine with vLLM's
offline API (LLM.enqueue, llm_engine.step, finished RequestOutputs) and a continuous-batching
scheduler (at most `max_seqs` running; a waiting request is admitted as soon as one finishes):
concurrent calls get their own outputs in order, the engine holds the sequences of several calls
at once, an engine error reaches every waiting call, and `exclusive` waits for calls in flight.
The real runner: tests/test_vllm_engine.py and benchmarks/engine_occupancy.py."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from opsft.engines.vllm import Feeder


class Scheduler:
    def __init__(self):
        self.running: list = []


class SimEngine:
    """Each step adds one token (the request's prompt id + step) to every running request, finishes
    those that reached their length, then admits waiting ones up to max_seqs."""

    def __init__(self, max_seqs: int, fail_at_step: int | None = None):
        self.max_seqs, self.fail_at_step = max_seqs, fail_at_step
        self.waiting: list = []
        self.engine_core = SimpleNamespace(engine_core=SimpleNamespace(scheduler=Scheduler()))
        self.steps = 0
        self.lock = threading.Lock()  # the Feeder must never call the engine from two threads at once

    @property
    def running(self) -> list:
        return self.engine_core.engine_core.scheduler.running

    def add(self, rid, prompt, length):
        assert self.lock.acquire(blocking=False), "engine called from two threads at once"
        try:
            self.waiting.append({"id": rid, "prompt": prompt, "length": length, "tokens": []})
        finally:
            self.lock.release()

    def step(self):
        assert self.lock.acquire(blocking=False), "engine called from two threads at once"
        try:
            self.steps += 1
            if self.fail_at_step is not None and self.steps >= self.fail_at_step:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            while self.waiting and len(self.running) < self.max_seqs:
                self.running.append(self.waiting.pop(0))
            time.sleep(0.001)
            outputs, still = [], []
            for req in self.running:
                req["tokens"].append(req["prompt"][0] * 1000 + len(req["tokens"]))
                done = len(req["tokens"]) >= req["length"]
                outputs.append(SimpleNamespace(request_id=req["id"], finished=done,
                                               outputs=[SimpleNamespace(token_ids=list(req["tokens"]))]))
                if not done:
                    still.append(req)
            self.running[:] = still
            return outputs
        finally:
            self.lock.release()

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return self.get_num_unfinished_requests() > 0


class SimLLM:
    def __init__(self, engine: SimEngine):
        self.llm_engine, self.counter = engine, 0

    def enqueue(self, prompts, sampling, use_tqdm=False):
        """As vLLM 0.32: the engine knows a request by its given id, and enqueue returns the internal id (the
        given one with '-' and 8 random characters), which its outputs do not carry."""
        ids = []
        for p in prompts:
            self.counter += 1
            self.llm_engine.add(str(self.counter), p["prompt_token_ids"], sampling["lengths"][p["prompt_token_ids"][0]])
            ids.append(f"{self.counter}-{uuid.uuid4().hex[:8]}")
        return ids


def expected(prompt_id: int, length: int) -> list[int]:
    return [prompt_id * 1000 + t for t in range(length)]


def run_batches(feeder: Feeder, batches: list[list[int]], lengths: dict, calls: int) -> list:
    def one(batch):
        outs = feeder.generate([{"prompt_token_ids": [p]} for p in batch], {"lengths": lengths})
        return [list(o.outputs[0].token_ids) for o in outs]

    if calls == 1:
        return [one(b) for b in batches]
    with ThreadPoolExecutor(calls) as pool:
        # every call at the intake before the engine takes any (however late a thread starts): the
        # overlap below is then the Feeder's doing, not the timing of threads
        with feeder.exclusive():
            futures = [pool.submit(one, b) for b in batches]
            while len(feeder.intake) < len(batches):
                time.sleep(0.001)
        return [f.result(timeout=60) for f in futures]


def test_concurrent_calls_get_their_own_outputs_and_fill_the_engine():
    lengths = {p: 3 + (p * 7) % 11 for p in range(1, 65)}  # 3..13 tokens: calls end at their slowest row
    batches = [list(range(b, b + 16)) for b in range(1, 65, 16)]
    results = {}
    for calls in (1, 4):
        engine = SimEngine(max_seqs=64)
        feeder = Feeder(SimLLM(engine))
        out = run_batches(feeder, batches, lengths, calls)
        for batch, rows in zip(batches, out, strict=True):
            assert rows == [expected(p, lengths[p]) for p in batch]  # each call its own rows, in its order
        results[calls] = (engine.steps, feeder.stats)
        assert feeder.stats["tokens"] == sum(lengths.values())
    (steps1, one), (steps4, four) = results[1], results[4]
    # one call at a time: 16 sequences at most, the engine drains at the end of each call (4 x 13 steps);
    # four calls in flight: the 64 rows share steps (13 steps: the longest row)
    assert one["held_max"] == 16 and steps1 == 4 * 13
    assert four["held_max"] == 64 and steps4 == 13
    assert four["held_sum"] / four["steps"] > one["held_sum"] / one["steps"]


def test_an_engine_error_reaches_every_waiting_call_and_the_next_call_runs():
    lengths = {p: 20 for p in range(1, 9)}
    engine = SimEngine(max_seqs=8, fail_at_step=5)
    feeder = Feeder(SimLLM(engine))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_batches, feeder, [[1, 2, 3, 4]], lengths, 1),
                   pool.submit(run_batches, feeder, [[5, 6, 7, 8]], lengths, 1)]
        for f in futures:
            with pytest.raises(RuntimeError, match="CUDA error"):
                f.result(timeout=30)
    assert not feeder.pending
    engine.fail_at_step = None
    engine.running.clear()
    engine.waiting.clear()
    assert run_batches(feeder, [[3]], {3: 2}, 1) == [[expected(3, 2)]]


def test_a_request_vllm_lost_fails_its_call_instead_of_spinning():
    engine = SimEngine(max_seqs=8)
    feeder = Feeder(SimLLM(engine))
    engine.add = lambda rid, prompt, length: None  # accepted, then never scheduled nor answered
    with pytest.raises(RuntimeError, match="vLLM has no request left, yet 1 had no output"):
        run_batches(feeder, [[1]], {1: 3}, 1)


def test_exclusive_waits_for_calls_in_flight():
    lengths = {p: 30 for p in range(1, 5)}
    engine = SimEngine(max_seqs=8)
    feeder = Feeder(SimLLM(engine))
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(run_batches, feeder, [[1, 2, 3, 4]], lengths, 1)
        while not feeder.pending and not call.done():  # admitted (or already finished, on a slow machine)
            time.sleep(0.001)
        with feeder.exclusive() as llm:
            # every request of the call finished before the runner was handed over
            assert not feeder.pending and not engine.running and not engine.waiting
            assert llm is feeder.llm and engine.steps == 30
        assert call.result()[0][0] == expected(1, 30)
