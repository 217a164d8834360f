"""Row faults and engine faults: which failures become a row's `error`, and which never do.

A **row fault** is the row's own: the input is invalid (opsft.data.corpus's rules, written as
`error` by the row functions themselves), or the row function raises for this row alone while
the engine is healthy. It is written with `error` and counts as done.

An **engine fault** is the engine's: it raises for rows it could serve before (a CUDA error, a dead
vLLM engine core, an engine that failed to start). It is never written: the caller replaces the
engine (a Ray actor dies and Ray restarts it; in-process the engine is rebuilt) and the rows are
done again; after a bounded number of tries the job fails, naming the cause.

How a failure is classified (`Guard.apply`): when a batch raises,
  1. an error that only an engine raises (EngineFault, vLLM's EngineDeadError, a CUDA / NCCL
     error text) is an engine fault at once;
  2. otherwise the engine is re-checked with known-good requests (`probe`): a tiny request through
     each capability this engine has already served in this process (score, generate, decode:
     the very methods the row functions call), or the engine's own `check()` when it has served
     nothing yet. If the check fails, it is an engine fault;
  3. otherwise the batch is retried row by row, and each row that raises alone is judged the same
     way (the check runs again before a row is blamed): a row fault only while the engine passes.

    guard = Guard(engine)
    rows = guard.apply(score_rows, rows, {"include_eos": False})   # raises EngineFault, or returns rows
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# Errors only a broken engine raises: by class name (anywhere in the exception's cause chain) or by text.
ENGINE_ERROR_TYPES = ("EngineFault", "EngineDeadError", "EngineGenerateError", "AcceleratorError")
ENGINE_ERROR_TEXT = ("CUDA error", "CUDA-capable device", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                     "NCCL error", "device-side assert", "illegal memory access", "EngineCore encountered",
                     "engine core died", "Engine loop is not running", "HIP error", "XPU error")
# The engine methods a row function may call, and the capability each one exercises.
CALLS = {"score_tokens": "score", "generate": "generate", "hinted_decode": "decode", "open_stream": "decode"}


class EngineFault(RuntimeError):
    """The engine, not the row, failed: never written as a row error. `cause` says why (one line)."""

    def __init__(self, cause: BaseException | str, check: BaseException | None = None):
        self.cause = describe(cause) if isinstance(cause, BaseException) else str(cause)
        self.check = describe(check) if check is not None else None
        text = self.cause + (f" (and the engine failed its health check: {self.check})" if self.check else "")
        super().__init__(text)


class JobFailed(RuntimeError):
    """A job stopped because its engines kept failing: the message names the cause; a rerun resumes."""


def describe(exc: BaseException, limit: int = 400) -> str:
    """`Type: message`, on one line, at most `limit` characters."""
    text = " ".join(str(exc).split())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return out if len(out) <= limit else out[: limit - 3] + "..."


def is_engine_error(exc: BaseException) -> bool:
    """An error that only a broken engine raises (its type or text, anywhere in its cause chain)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, EngineFault) or type(exc).__name__ in ENGINE_ERROR_TYPES:
            return True
        if any(marker in str(exc) for marker in ENGINE_ERROR_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Watched:
    """An engine seen through a proxy that records which capabilities it served successfully in
    this process (the guard probes those); every other attribute is the engine's own."""

    def __init__(self, engine):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_served", set())

    def __getattr__(self, name):
        value = getattr(self._engine, name)
        if name not in CALLS or not callable(value):
            return value
        served = self._served

        def call(*args, **kwargs):
            out = value(*args, **kwargs)
            served.add(CALLS[name])
            return out

        return call

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)


def unwrap(engine):
    return engine._engine if isinstance(engine, Watched) else engine


def _probe_ids(engine) -> list[int]:
    tok = engine.tokenizer
    ids = list(tok("The sky is blue.", add_special_tokens=False)["input_ids"])
    eos = getattr(tok, "eos_token_id", None)
    while len(ids) < 3:
        ids.append(eos if eos is not None else 0)
    return ids[:8]


def probe(engine, capabilities: set[str]) -> None:
    """Known-good requests through each of these capabilities (raises what the engine raises); with
    none named (the engine has served nothing yet), the engine's own `check()`, if it has one."""
    base = unwrap(engine)
    if not capabilities:
        check = getattr(base, "check", None)
        if check is not None:
            check()
        return
    from opsft.engines.base import GenerationParams

    ids = _probe_ids(base)
    if "score" in capabilities:
        out = base.score_tokens([ids], [1])
        if len(out) != 1 or len(out[0].logprob) != len(ids) - 1:
            raise RuntimeError("the engine's scores of a known-good request have the wrong shape")
    if "generate" in capabilities:
        base.generate([ids], GenerationParams(max_new_tokens=1))
    if "decode" in capabilities:
        from opsft.method.hinted import hinted_decode
        from opsft.method.hinted_params import HDItem, HDParams

        item, params = HDItem(hinted_prompt=ids, student_prompt=ids, seed=0), HDParams(max_new_tokens=1, splitter=None)
        eos = {base.tokenizer.eos_token_id} - {None}
        if hasattr(base, "hinted_decode"):
            base.hinted_decode([item], params, eos)
        else:
            hinted_decode(base, [item], params, eos)


class Guard:
    """Applies row functions to batches on one engine and tells row faults from engine faults
    (module doc). `engine` may be None (a CPU stage: every failure is the row's). `health`: a
    check to run instead of probing this engine (e.g. several engines of an in-process rewrite)."""

    def __init__(self, engine, health: Callable[[], None] | None = None):
        self.raw = engine
        self.engine = Watched(engine) if engine is not None else None
        self.health = health

    def served(self) -> set[str]:
        return set(self.engine._served) if self.engine is not None else set()

    def healthy(self) -> BaseException | None:
        """None when the engine passes its check, else the error the check raised."""
        try:
            if self.health is not None:
                self.health()
            else:
                probe(self.raw, self.served())
        except Exception as exc:  # noqa: BLE001 - any failure of a known-good request condemns the engine
            return exc
        return None

    def blame(self, exc: BaseException) -> None:
        """Raise EngineFault when the engine (not the row) is at fault for `exc`."""
        if self.engine is None and self.health is None:
            return
        if is_engine_error(exc):
            raise EngineFault(exc) from exc
        bad = self.healthy()
        if bad is not None:
            raise EngineFault(exc, bad) from exc

    def apply(self, fn, rows: list[dict], kwargs: dict) -> list[dict]:
        """fn(rows, engine, **kwargs) over a batch, rows out == rows in; a row that raises alone while
        the engine is healthy gets `error`; an engine fault raises EngineFault (nothing written)."""
        from opsft.data.corpus import with_id

        try:
            out = fn(rows, self.engine, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below: the engine's fault, or a row's
            self.blame(exc)
            log.warning("batch of %d rows failed (%s) on a healthy engine; retrying row by row", len(rows),
                        describe(exc))
            out = []
            for row in rows:
                try:
                    out += fn([row], self.engine, **kwargs)
                except Exception as row_exc:  # noqa: BLE001
                    self.blame(row_exc)
                    out.append({**with_id(row), "error": describe(row_exc)})
        if len(out) != len(rows):
            raise RuntimeError(f"row function returned {len(out)} rows for {len(rows)}: it must keep rows 1:1")
        return out


def apply_rows(fn, rows: list[dict], engine, kwargs: dict) -> list[dict]:
    """fn over a batch with Guard(engine)'s rules (one call: no engine history, so the engine's own
    check decides): rows out == rows in, a row that raises alone gets `error`."""
    return Guard(engine).apply(fn, rows, kwargs)


def _bound(fn: Callable, engine) -> Callable:
    """fn with its engine argument fixed (the guard's own engine argument is ignored)."""

    def call(rows, _engine, **kwargs):
        return fn(rows, engine, **kwargs)

    return call


class EngineSlot:
    """An in-process engine that is rebuilt after an engine fault: `run` retries a batch on a new
    engine up to `retries` times, then raises JobFailed naming the cause. `build()` makes the
    engine(s): one engine, or a dict of engines (checked together)."""

    def __init__(self, build: Callable[[], object], retries: int = 3, what: str = "engine"):
        self.build, self.retries, self.what = build, retries, what
        self.faults: list[str] = []
        self.current = build()

    def _guard(self) -> Guard:
        if isinstance(self.current, dict):
            engines = list({id(e): e for e in self.current.values()}.values())
            return Guard(None, health=lambda: [probe(e, set()) for e in engines])
        return Guard(self.current)

    def run(self, fn: Callable, rows: list[dict], kwargs: dict, engine_arg: Callable | None = None) -> list[dict]:
        """Guard.apply on the current engine; after an engine fault, a new engine and the same rows.
        engine_arg(current) -> what fn gets as its engine (default: the current engine)."""
        while True:
            guard = self._guard()
            try:
                if engine_arg is None:
                    return guard.apply(fn, rows, kwargs)
                return guard.apply(_bound(fn, engine_arg(self.current)), rows, kwargs)
            except EngineFault as fault:
                self.faults.append(str(fault))
                if len(self.faults) > self.retries:
                    raise JobFailed(f"the {self.what} failed {len(self.faults)} times, each time with an engine "
                                    f"fault; last: {fault}") from fault
                log.error("engine fault (%s); replacing the %s and trying these %d rows again (%d of %d)",
                          fault, self.what, len(rows), len(self.faults), self.retries)
                self.close()
                self.current = self.build()

    def close(self) -> None:
        """Close the current engine(s)."""
        engines = self.current.values() if isinstance(self.current, dict) else [self.current]
        for engine in {id(e): e for e in engines}.values():
            close = getattr(engine, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - a broken engine may fail to close; it is replaced anyway
                    log.exception("closing a failed engine raised")
