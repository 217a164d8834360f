"""The Ray Serve deployments of the CLL scoring API.

- ModelRegistry (1 replica, no CPU): which checkpoint is current, and its version. A scorer
  replica that starts later (autoscaling, restart) loads what the registry names. With
  `current_link` the registry is the durable pointer's one reader (at start: it serves the link's
  target) and one writer (after a reload every replica loaded: opsft.serve.current.point_link).
- Scorer (the replicas that hold an engine): validates each request's items with the
  tokenizer, merges concurrent requests into one scoring call (@serve.batch), runs it on
  one worker thread, and swaps engines on `load(record)` while requests keep flowing. An
  engine fault (opsft.faults: the engine, re-checked, fails) answers 503 and fails the
  replica's health check, so Serve replaces it; it is never a 4xx on a good request.
- ScoreAPI (the FastAPI ingress, no model): HTTP, limits, auth (opsft.serve.auth: it refuses to
  start without an API key unless allow_open); sends a request again when the scorer replica it
  went to dies or its engine failed (scoring has no side effects); on a reload it checks the path
  against the model roots, promotes the checkpoint in the registry, broadcasts `load` to every
  scorer replica, then has the registry record it in the current link.

The engine is built by `engine_factory(model)`; the default makes an opsft engine from the
config (tests may hand in another picklable callable).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.metrics import Counter, Histogram

from opsft.config import EngineConfig, ServeConfig
from opsft.faults import EngineFault, Guard
from opsft.serve.auth import read_keys
from opsft.serve.core import Job, prepare_job, score_jobs_guarded
from opsft.serve.current import ModelPathError, check_model_path, default_roots, point_link, read_link
from opsft.serve.http import Limits, build_http_app

log = logging.getLogger("ray.serve.opsft")  # under Serve's logger: lands in the replica logs
# Tries per scoring request when its scorer replica dies under it (killed, OOM, node lost): Serve's
# router drops a dead replica at once, so the next try goes to a live one, or waits for the restart.
SCORE_ATTEMPTS = 3


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class EngineFactory:
    """model (folder, hub id or None = the configured/default model) -> opsft engine."""

    def __init__(self, engine: EngineConfig):
        self.engine = engine

    def __call__(self, model: str | None):
        from opsft.engines import make_engine

        cfg = self.engine.for_stage("score")  # a vLLM scorer starts its scoring runner only
        engine = make_engine(cfg.kind, model or cfg.model, **cfg.options())
        if hasattr(engine, "start"):  # vllm: its pooling runner now (a load that fails fails here), not at a request
            engine.start("score")
        return engine


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class ModelRegistry:
    """The current model record: {model, version, source, promoted_at}. With `current_link` the
    model at start is the link's target (source 'current_link'), and `record` moves the link."""

    def __init__(self, model: str | None, current_link: str | None = None):
        self.current_link = current_link
        linked = read_link(current_link) if current_link else None
        source = "config" if linked is None else "current_link"
        self.record = {"model": linked or model, "version": 0, "source": source, "promoted_at": utc_now()}
        log.info("model registry: serving %s (from %s)", self.record["model"], source)

    def current(self) -> dict:
        return self.record

    def promote(self, model: str) -> tuple[dict, dict]:
        """Make `model` current; returns (new record, previous record)."""
        previous = self.record
        self.record = {"model": model, "version": previous["version"] + 1, "source": "reload",
                       "promoted_at": utc_now()}
        return self.record, previous

    def restore(self, record: dict) -> None:
        """Undo a promotion that no replica could load."""
        self.record = record

    def persist(self, record: dict) -> bool:
        """Make the promotion outlive this process: point current_link at the record's model
        (atomically). False when there is no link to move."""
        if not self.current_link:
            return False
        point_link(self.current_link, record["model"])
        log.info("model registry: %s -> %s", self.current_link, record["model"])
        return True


@serve.deployment(max_ongoing_requests=64)
class Scorer:
    async def __init__(self, config: dict, registry, engine_factory=None):
        self.cfg = ServeConfig.model_validate(config)
        self.factory = engine_factory or EngineFactory(self.cfg.engine)
        threads = self.cfg.torch_threads or max(1, math.ceil(self.cfg.num_cpus))
        import torch

        torch.set_num_threads(threads)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="opsft-score")  # one forward pass at a time
        self.reload_lock = asyncio.Lock()
        self.in_flight: collections.Counter = collections.Counter()  # scoring calls running, per engine id
        self.retiring: set[asyncio.Task] = set()  # swapped-out engines waiting for their calls to end
        self.replica = replica_name()
        record = await registry.current.remote()
        engine = await asyncio.to_thread(self.factory, record["model"])
        self.current = (engine, record, utc_now(), Guard(engine))  # swapped as one attribute
        self.dead: str | None = None  # an engine fault: this replica answers 503 until Serve replaces it
        self._score_batch.set_max_batch_size(self.cfg.max_batch_requests)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.items = Counter("opsft_scored_items", description="items scored")
        self.tokens = Counter("opsft_scored_tokens", description="response tokens scored")
        self.batch_rows = Histogram("opsft_batch_rows", description="rows per scoring call",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256])
        self.batch_seconds = Histogram("opsft_batch_seconds", description="seconds per scoring call",
                                       boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        log.info("scorer %s serving %s (version %d, %d torch threads)", self.replica, engine.model_id,
                 record["version"], threads)

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine failed is replaced (a new process, a new engine)."""
        if self.dead:
            raise RuntimeError(f"scorer {self.replica}: engine fault: {self.dead}")

    def unavailable(self) -> dict:
        return {"status": 503, "engine_fault": True,
                "detail": f"the scorer's engine failed ({self.dead}); the replica is being replaced, try again"}

    async def score(self, job: Job) -> dict:
        if self.dead:
            return self.unavailable()
        engine = self.current[0]
        job, error = prepare_job(engine, job)  # its items tokenised once, here: a bad item answers 422 now
        if error is not None:
            return error
        if self.cfg.batching:
            return await self._score_batch(job)
        return (await self._run([job]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, jobs: list[Job]) -> list[dict]:
        return await self._run(jobs)

    async def _run(self, jobs: list[Job]) -> list[dict]:
        engine, record, _, guard = self.current  # in-flight calls finish on the engine they started with
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.in_flight[id(engine)] += 1
        try:
            call = loop.run_in_executor(self.worker, score_jobs_guarded, guard, jobs, self.cfg.temperature)
            try:
                answers = await asyncio.wait_for(asyncio.shield(call), self.cfg.stall_timeout_s)
            except TimeoutError:  # a call that never returns: the engine hung (its thread is left to the replica's end)
                raise EngineFault(f"the engine stalled: no result for {self.cfg.stall_timeout_s:g} s "
                                  "(stall_timeout_s)") from None
        except EngineFault as fault:
            if self.current[0] is engine:  # a reload since may have replaced it already
                self.dead = str(fault)
                log.error("scorer %s: engine fault (%s); answering 503 until Serve replaces this replica",
                          self.replica, fault)
                return [self.unavailable() for _ in jobs]
            return [{"status": 503, "engine_fault": True, "detail": f"the previous engine failed ({fault}); "
                     "try again"} for _ in jobs]
        finally:
            self.in_flight[id(engine)] -= 1
        seconds = time.perf_counter() - start
        rows = sum(len(job.rows) for job in jobs)
        tokens = sum(r["n_tokens"] for a in answers for r in a.get("results", ()))
        self.items.inc(rows)
        self.tokens.inc(tokens)
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)
        log.info("scored %d requests, %d rows, %d tokens in %.3f s", len(jobs), rows, tokens, seconds)
        for answer in answers:
            if "results" in answer:
                answer.update(model=engine.model_id, model_version=record["version"])
        return answers

    async def load(self, record: dict) -> dict:
        """Switch to record's model: load it next to the current one, then swap."""
        async with self.reload_lock:
            if record["version"] != self.current[1]["version"]:
                start = time.perf_counter()
                engine = await asyncio.to_thread(self.factory, record["model"])
                old = self.current[0]
                self.current = (engine, record, utc_now(), Guard(engine))
                self.dead = None  # a new engine
                self.retiring.add(asyncio.create_task(self._retire(old)))
                log.info("scorer %s now serves %s (version %d), loaded in %.1f s", self.replica,
                         engine.model_id, record["version"], time.perf_counter() - start)
        return self.info()

    async def _retire(self, engine) -> None:
        """Close a swapped-out engine once the calls that started on it are done: an engine that
        holds a device (vLLM's runners, their KV cache) frees it only when closed."""
        try:
            while self.in_flight[id(engine)] > 0:
                await asyncio.sleep(0.05)
            self.in_flight.pop(id(engine), None)
            close = getattr(engine, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
        except Exception:  # noqa: BLE001 - a failed close must not break serving; it is logged
            log.exception("scorer %s: closing the previous engine failed", self.replica)
        finally:
            self.retiring.discard(asyncio.current_task())

    def info(self) -> dict:
        engine, record, loaded_at, _ = self.current
        return {"replica": self.replica, "model": engine.model_id, "version": record["version"],
                "loaded_at": loaded_at}


def replica_died(exc: BaseException) -> bool:
    """The error of a call whose replica died or became unreachable (not one the call raised)."""
    return isinstance(exc, RayActorError) or isinstance(getattr(exc, "cause", None), RayActorError)


async def retry_if_replica_died(call, attempts: int = SCORE_ATTEMPTS):
    """`await call()`, made again (up to `attempts` in all) when its replica died. Only for calls
    without side effects: a replica may die after it did the work."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if attempt == attempts or not replica_died(exc):
                raise
            log.warning("scorer replica died during a request (%s); sending it again (try %d of %d)",
                        type(exc).__name__, attempt + 1, attempts)
    raise AssertionError("unreachable")


async def retry_engine_faults(call, attempts: int = SCORE_ATTEMPTS) -> dict:
    """`await call()`, made again (up to `attempts` in all) while its answer says the scorer's engine
    failed (that replica answers 503 until Serve replaces it; the router picks another). A 503 only
    when every try met a failed engine."""
    for attempt in range(1, attempts + 1):
        answer = await call()
        if not answer.get("engine_fault"):
            return answer
        log.warning("a scorer's engine failed under a request (try %d of %d): %s", attempt, attempts,
                    answer["detail"])
    return answer


def replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (local testing mode)
        return f"pid{os.getpid()}"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress()
class ScoreAPI:
    def __init__(self, config: dict, scorer, registry):
        self.cfg = ServeConfig.model_validate(config)
        keys = read_keys(self.cfg)  # no API key and not allow_open: the ingress refuses to start
        self.scorer, self.registry = scorer, registry
        self.roots = self.cfg.model_roots or default_roots(self.cfg.engine.model, self.cfg.current_link)
        self.limits = Limits(max_items=self.cfg.max_items, max_body_bytes=self.cfg.max_body_bytes,
                             api_key=keys.api_key, admin_key=keys.admin_key, allow_open=keys.allow_open)
        log.info("scoring API: auth %s, reloads %s, model roots %s", "on" if keys.api_key else "OFF (allow_open)",
                 "need the admin key" if keys.admin_key else "open (allow_open)" if keys.allow_open else "disabled",
                 self.roots)
        self.requests = Counter("opsft_http_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("opsft_http_latency_ms", description="HTTP latency by route",
                                 boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                 tag_keys=("route",))
        self.reload_lock = asyncio.Lock()
        self.in_flight: collections.Counter = collections.Counter()  # scoring calls running, per engine id
        self.retiring: set[asyncio.Task] = set()  # swapped-out engines waiting for their calls to end

    def __serve_build_asgi_app__(self):
        return build_http_app(self, self.limits, on_request=self.record_request)

    def record_request(self, route: str, status: int, ms: float) -> None:
        route = route if route in ("/healthz", "/v1/score", "/v1/models", "/v1/models/reload") else "other"
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(ms, tags={"route": route})

    async def score(self, job: Job) -> dict:
        """The scorer's answer; sent again (to another replica, as the router picks) when the replica died
        or its engine failed."""
        return await retry_engine_faults(lambda: retry_if_replica_died(lambda: self.scorer.score.remote(job)))

    async def models(self, replicas: list[dict] | None = None) -> dict:
        record = await self.registry.current.remote()
        if replicas is None:
            replicas = await self.scorer.broadcast("info").results_async(timeout_s=30)
        model = next((r["model"] for r in replicas if r["version"] == record["version"]), record["model"] or "")
        info = {"model": model, "name": Path(model).name or model, "source": record["source"],
                "version": record["version"], "loaded_at": record["promoted_at"],
                "replicas": sorted(replicas, key=lambda r: r["replica"])}
        return {"data": [info]}

    async def reload(self, model: str) -> dict:
        """Promote `model` (a checkpoint under a model root) and load it on every scorer replica, then
        record it in the current link; on any failure keep the old one everywhere."""
        try:
            model = check_model_path(model, self.roots)
        except ModelPathError as exc:
            return {"status": exc.status, "detail": str(exc)}
        async with self.reload_lock:
            record, previous = await self.registry.promote.remote(model)
            answers = await self.scorer.broadcast("load", record).results_async(
                timeout_s=self.cfg.reload_timeout_s, return_exceptions=True)
            loaded = [a for a in answers if not isinstance(a, BaseException)]
            # A replica that died meanwhile is no failure to load once another one loaded the model
            # (its replacement asks the registry); if none did, the model may be what kills them.
            failed = [a for a in answers if isinstance(a, BaseException) and not (loaded and replica_died(a))]
            if failed:
                await self.undo(previous)
                cause = getattr(failed[0], "cause", None) or failed[0]
                return {"status": 422, "detail": f"cannot load model {model!r}: {type(cause).__name__}: "
                                                  f"{str(cause).strip().splitlines()[-1][:300]}"}
            try:
                await self.registry.persist.remote(record)
            except Exception as exc:  # noqa: BLE001 - the link could not move: the promotion would not last
                await self.undo(previous)
                cause = getattr(exc, "cause", None) or exc
                return {"status": 500, "detail": f"loaded {model!r} but could not record it in current_link "
                                                  f"{self.cfg.current_link}: {type(cause).__name__}: {cause}"[:600]
                                                  + "; the previous model is served"}
            return await self.models(loaded)

    async def undo(self, previous: dict) -> None:
        """Back to the previous record, in the registry and on every replica."""
        await self.registry.restore.remote(previous)
        await self.scorer.broadcast("load", previous).results_async(
            timeout_s=self.cfg.reload_timeout_s, return_exceptions=True)
