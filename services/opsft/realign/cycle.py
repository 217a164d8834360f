"""One realignment cycle: keep a training corpus on-policy for the newest model.

    opsft realign --config realign.yaml

Stages, each writing into the cycle's data folder `<data_dir>/cycles/vNNNN/` (data_dir: a folder
or s3://..., default output_dir; the state and the lock stay in the POSIX folder output_dir):

    score     the corpus under the current model               -> scored.parquet/  (Ray Data job: a folder of parts)
    select    rows that drifted off-policy (CLL threshold or bottom quantile)
                                                               -> selected.parquet, kept.parquet
    rewrite   the selected rows (self-first hinted decoding)   -> rewritten.parquet/
    merge     kept rows, then the rewritten ones               -> corpus.parquet (the new corpus; `rewritten`
                                                                  says which rows this cycle rewrote)
    train     fine-tune the current model on it (IDFT)         -> train/ (Ray Train; its checkpoints, and
                                                                  train/final, the stable copy of the last one)
    rescore   the new corpus under the new model               -> rescored.parquet/
    report    before/after CLL, counts by source, training     -> report/summary.json + PNGs
    promote   POST /v1/models/reload to a scoring service (optional; transient errors are retried
              with backoff, a refusal fails at once); the service records the promoted checkpoint in its
              current link, so a restarted service serves it

The current model is the checkpoint of the newest completed cycle, else `model` from the
config (with `start_from: model`, always `model`). `state.json` records the completed
stages: a cycle that crashed continues from its last completed stage when run again (a Ray Data
job resumes from its parts' progress records, training from its last checkpoint; the others are
redone). Every stage streams: the driver holds a batch of rows at a time, never the corpus. The
cycle's fingerprint (corpus content, current model, config) names what it was made from: a run
whose inputs did not change finds the finished cycle and does nothing. A lock on the output
folder keeps two cycles from running at once.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path

from opsft.data import storage
from opsft.data.corpus import write_rows, write_rows_chunked, write_text_atomic
from opsft.realign.lock import OutputLock
from opsft.score_columns import SCORED_COLUMNS

log = logging.getLogger(__name__)
STAGES = ("score", "select", "rewrite", "merge", "train", "rescore", "report", "promote")
FAIL_ENV = "OPSFT_REALIGN_FAIL_AT"  # testing: crash inside this stage, after its work has started


class InjectedCrash(RuntimeError):
    pass


# ---------------------------------------------------------------------------- selection


def drift_key(row: dict) -> tuple[float, str] | None:
    """(cll, id): the order in which rows drifted off-policy (ties broken by id); None for a row
    that is never selected (an error, no score, a score that is not a number, NaN)."""
    cll = row.get("cll")
    if row.get("error") or isinstance(cll, bool) or not isinstance(cll, int | float) or cll != cll:
        return None
    return (float(cll), str(row["id"]))


def drift_rule(make_rows: Callable[[], Iterable[dict]], mode: str, value: float) -> Callable[[dict], bool]:
    """Which rows to rewrite: cll < value (mode 'threshold'), or the lowest `value` fraction by
    (cll, id) (mode 'quantile': deterministic under ties). `make_rows()` gives a fresh pass over the
    scored rows (only id, cll and error are read). A quantile takes two passes: the first keeps the
    scores on disk in sorted runs (opsft.report.SortedColumn) and finds the cut-off score exactly;
    the second collects the ids needed among the rows tied at the cut-off. Memory holds those ids
    only, never the corpus."""
    if mode == "threshold":
        return lambda row: (key := drift_key(row)) is not None and key[0] < value
    if mode != "quantile":
        raise ValueError(f"select mode must be 'threshold' or 'quantile', got {mode!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {value}")
    import tempfile

    import numpy as np

    from opsft.report import SortedColumn

    with tempfile.TemporaryDirectory(prefix="opsft-select-") as folder:
        scores = SortedColumn(folder)
        chunk: list[float] = []
        for key in map(drift_key, make_rows()):
            if key is not None:
                chunk.append(key[0])
                if len(chunk) >= 65536:
                    scores.add(np.array(chunk))
                    chunk = []
        scores.add(np.array(chunk))
        count = int(round(value * scores.n))
        if count == 0:
            return lambda row: False
        cut = scores.kth(count - 1)
        need = count - int(scores.counts(np.array([cut]), "left")[0])  # rows at the cut-off score to take
    tied = heapq.nsmallest(need, (k[1] for k in map(drift_key, make_rows()) if k is not None and k[0] == cut))
    cutoff = (cut, tied[-1])
    return lambda row: (key := drift_key(row)) is not None and key <= cutoff


def select_drifted(rows: list[dict], mode: str, value: float) -> set[str]:
    """Ids of the rows drift_rule selects."""
    rule = drift_rule(lambda: rows, mode, value)
    return {str(r["id"]) for r in rows if rule(r)}


def merge_corpus(kept: Iterable[dict], rewritten: Iterable[dict]) -> Iterator[dict]:
    """The new corpus, streamed: the kept rows (source 'kept' unless they carry one), then the
    rewritten rows; the score columns of the old model are dropped (they describe the old corpus),
    a row's own error is kept; `rewritten` says whether this cycle rewrote the row."""
    tagged = chain(((row, "kept") for row in kept), ((row, None) for row in rewritten))
    for row, default_source in tagged:
        base = {k: v for k, v in row.items() if k not in SCORED_COLUMNS}
        if default_source:
            base.setdefault("source", default_source)
        base["rewritten"] = default_source is None
        if row.get("error"):
            base["error"] = row["error"]
        yield base


# ---------------------------------------------------------------------------- fingerprints


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:  # head and tail: cheap for multi-GB weights, changes with any retrain
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))


def model_fingerprint(model: str) -> str:
    h = hashlib.sha256()
    if storage.is_uri(model):  # object storage: the files' names, sizes and modification times
        h.update(json.dumps([model, storage.fingerprint_entries(model)]).encode())
        return h.hexdigest()
    path = Path(model)
    if not path.is_dir():
        h.update(model.encode())  # a hub id
        return h.hexdigest()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".bin") or f.name.endswith(".model")):
            _file_digest(f, h)
    return h.hexdigest()


def corpus_fingerprint(path: str) -> str:
    """The corpus' content (a local file or folder, read in 1 MiB blocks), or on object storage its
    objects' names, sizes and modification times (an object's time changes with every write)."""
    h = hashlib.sha256()
    if storage.is_uri(path):
        h.update(json.dumps(storage.fingerprint_entries(path)).encode())
        return h.hexdigest()
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- the cycle


class Cycle:
    """A realignment cycle over `cfg` (a RealignConfig). Stage runners are injectable
    (`runners`) so a test can swap one; the defaults call the project's jobs."""

    def __init__(self, cfg, runners: dict[str, Callable] | None = None):
        from opsft.stages import check_stages

        # The cycle's engine serves scoring and the rewrite's stages (with rewrite.stages' overrides): an
        # engine that cannot do a stage is refused here, before any job starts, instead of erroring every row.
        check_stages(cfg.rewrite, cfg.engine, cfg.pool)
        self.cfg = cfg
        self.root = Path(cfg.output_dir).resolve()
        self.runners = {**default_runners(), **(runners or {})}

    # -- where things are
    def cycles(self) -> list[Path]:
        return sorted(p for p in (self.root / "cycles").glob("v*") if p.is_dir())

    def latest_completed(self) -> Path | None:
        done = [c for c in self.cycles() if _load_state(c).get("complete")]
        return done[-1] if done else None

    def current_model(self) -> str:
        from opsft.models import resolve_model

        last = self.latest_completed() if self.cfg.start_from == "latest" else None
        if last is not None:
            return _load_state(last)["outputs"]["train"]["checkpoint"]
        return resolve_model(self.cfg.model)

    def fingerprint(self, model: str) -> str:
        config = self.cfg.model_dump(mode="json", exclude={"output_dir", "data_dir", "rows_per_part", "start_from",
                                                                "promote_url", "promote_api_key_env",
                                                                "promote_timeout_s", "promote_attempts",
                                                                "promote_backoff_s", "promote_backoff_max_s"})
        blob = json.dumps({"corpus": corpus_fingerprint(self.cfg.corpus), "model": model_fingerprint(model),
                           "config": config}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_fits(self, model: str) -> None:
        """opsft plan's check before any engine or worker starts: a stage that cannot fit its GPU fails the
        cycle in seconds (PlanError), not after a model loaded. Joins the cluster first to learn its GPUs."""
        from opsft.plan import has_gpu_stage, preflight

        if has_gpu_stage(self.cfg):
            _connect(self)
            preflight(self.cfg, model)

    # -- running
    def run(self, wait: bool = False) -> dict:
        with OutputLock(self.root, wait=wait):
            model = self.current_model()
            self.check_fits(model)
            fp = self.fingerprint(model)
            folder = next((c for c in self.cycles() if _load_state(c).get("fingerprint") == fp), None)
            if folder is not None and _load_state(folder).get("complete"):
                log.info("inputs unchanged since %s: nothing to do", folder)
                return {"cycle": str(folder), "status": "up-to-date", **_load_state(folder)}
            if folder is None:
                folder = self.root / "cycles" / f"v{len(self.cycles()) + 1:04d}"
                folder.mkdir(parents=True)
                data = storage.join(self.cfg.data_dir, "cycles", folder.name) if self.cfg.data_dir else str(folder)
                _save_state(folder, {"fingerprint": fp, "model": model, "corpus": str(self.cfg.corpus), "data": data,
                                     "started": time.time(), "stages": [], "outputs": {}})
            else:
                log.info("resuming %s after stage(s) %s", folder, _load_state(folder)["stages"])
            return self._run_stages(folder)

    def _run_stages(self, folder: Path) -> dict:
        state = _load_state(folder)
        for stage in STAGES:
            if stage in state["stages"]:
                continue
            if stage == "promote" and not self.cfg.promote_url:
                state["outputs"]["promote"] = {"skipped": "no promote_url"}
            else:
                log.info("[%s] stage %s", folder.name, stage)
                start = time.monotonic()
                out = self.runners[stage](self, folder, state)
                out["seconds"] = round(time.monotonic() - start, 2)
                state["outputs"][stage] = out
            state["stages"].append(stage)
            _save_state(folder, state)
        state["complete"] = True
        state["finished"] = time.time()
        _save_state(folder, state)
        write_text_atomic(self.root / "LATEST", json.dumps({"cycle": str(folder),
                                                           "checkpoint": state["outputs"]["train"]["checkpoint"],
                                                           "corpus": data_path(folder, state, "corpus.parquet")}))
        return {"cycle": str(folder), "status": "completed", **state}


def _load_state(folder: Path) -> dict:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_state(folder: Path, state: dict) -> None:
    write_text_atomic(folder / "state.json", json.dumps(state, indent=2, default=str))


def maybe_crash(stage: str) -> None:
    if os.environ.get(FAIL_ENV) == stage:
        raise InjectedCrash(f"injected crash in stage {stage} ({FAIL_ENV})")


def data_path(folder: Path, state: dict, name: str) -> str:
    """Where a stage output of this cycle lives: in its data folder (local, or s3://...)."""
    return storage.join(state.get("data") or str(folder), name)


# ---------------------------------------------------------------------------- default stage runners


def _engine_for(cycle: Cycle, model: str):
    return cycle.cfg.engine.model_copy(update={"model": model})


def _connect(cycle: Cycle) -> None:
    """Join the cycle's cluster, or start a local one that holds the largest job (the rewrite's
    stage pools): the first stage that needs Ray calls this, the later calls are no-ops."""
    from opsft.cluster import connect
    from opsft.jobs.pipeline import local_num_cpus
    from opsft.stages import stage_pools

    connect(cycle.cfg.address, num_cpus=local_num_cpus(stage_pools(cycle.cfg.rewrite, cycle.cfg.pool)))


def run_score(cycle: Cycle, folder: Path, state: dict, *, corpus: str | None = None, model: str | None = None,
              out_name: str = "scored.parquet") -> dict:
    from opsft.jobs.pipeline import run_job, score_spec

    _connect(cycle)
    # the same job as `opsft score --ray`
    spec = score_spec(corpus or str(cycle.cfg.corpus), data_path(folder, state, out_name),
                      _engine_for(cycle, model or state["model"]), cycle.cfg.pool, name=out_name,
                      rows_per_part=cycle.cfg.rows_per_part)
    maybe_crash("score" if out_name == "scored.parquet" else "rescore")
    return run_job(spec)  # resumes from the progress records of the parts already written


def run_select(cycle: Cycle, folder: Path, state: dict) -> dict:
    from opsft.data.reader import iter_rows

    scored = data_path(folder, state, "scored.parquet")
    sel = cycle.cfg.select
    drifted = drift_rule(lambda: iter_rows(scored, ["id", "cll", "error"]), sel.mode,
                         sel.threshold if sel.mode == "threshold" else sel.quantile)
    maybe_crash("select")
    # streamed: each output is written chunk by chunk from passes over the scored parts
    selected = write_rows_chunked(lambda: (r for r in iter_rows(scored) if drifted(r)),
                                  data_path(folder, state, "selected.parquet"))
    kept = write_rows_chunked(lambda: (r for r in iter_rows(scored) if not drifted(r)),
                              data_path(folder, state, "kept.parquet"))
    return {"selected": selected, "kept": kept}


def run_rewrite(cycle: Cycle, folder: Path, state: dict) -> dict:
    from opsft.data.reader import count_rows
    from opsft.jobs.pipeline import rewrite_spec, run_job

    out = data_path(folder, state, "rewritten.parquet")
    if not count_rows(data_path(folder, state, "selected.parquet")):
        storage.delete(out)
        write_rows([], out)  # nothing drifted: an empty corpus, so the merge reads the same way
        return {"rows_in": 0, "rows_written": 0}
    _connect(cycle)
    # the same job as `opsft rewrite --ray`: one Ray Data pipeline, a map step per recipe stage; the rows
    # marked dropped stay in rewritten.parquet and the merge stage sets them aside
    spec = rewrite_spec(cycle.cfg.rewrite, data_path(folder, state, "selected.parquet"), out, model=state["model"],
                        engine=cycle.cfg.engine, pool=cycle.cfg.pool, rows_per_part=cycle.cfg.rows_per_part)
    maybe_crash("rewrite")
    return run_job(spec)


def run_merge(cycle: Cycle, folder: Path, state: dict) -> dict:
    from opsft.data.reader import iter_rows

    def merged():
        return merge_corpus(iter_rows(data_path(folder, state, "kept.parquet")),
                            iter_rows(data_path(folder, state, "rewritten.parquet")))

    maybe_crash("merge")
    # rewrite.drop_unverified: the dropped rows are not trained on; corpus + dropped = every row
    corpus = data_path(folder, state, "corpus.parquet")
    rows = write_rows_chunked(lambda: (r for r in merged() if not r.get("dropped")), corpus)
    dropped = write_rows_chunked(lambda: (r for r in merged() if r.get("dropped")),
                                 data_path(folder, state, "dropped.parquet"))
    sources: dict[str, int] = {}
    for row in iter_rows(corpus, ["source"]):
        key = row["source"] or "kept"
        sources[key] = sources.get(key, 0) + 1
    return {"rows": rows, "dropped": dropped, "sources": sources}


def run_train(cycle: Cycle, folder: Path, state: dict) -> dict:
    """Ray Train on the new corpus. Never started over: a rerun (or a Ray Train restart after a worker
    failure, train.max_failures) continues from the last checkpoint in train/. Metrics go to the
    local <cycle>/train/; checkpoints to the data folder (s3:// when data_dir is)."""
    from opsft.train.ray_job import run_ray

    out = folder / "train"
    checkpoints = data_path(folder, state, "train") if state.get("data") not in (None, str(folder)) else None
    tcfg = cycle.cfg.train.model_copy(update={"input": data_path(folder, state, "corpus.parquet"),
                                              "output_dir": str(out), "storage_path": checkpoints,
                                              "model": state["model"], "address": cycle.cfg.address})
    maybe_crash("train")
    summary = run_ray(tcfg)
    final = data_path(folder, state, "train/final")
    storage.delete(final)  # a stable path: Ray's checkpoint folder names vary
    storage.copy_tree(summary["checkpoint"], final)
    return {"checkpoint": final, "data": summary["data"], "final_metrics": summary["final"]}


def run_rescore(cycle: Cycle, folder: Path, state: dict) -> dict:
    return run_score(cycle, folder, state, corpus=data_path(folder, state, "corpus.parquet"),
                     model=state["outputs"]["train"]["checkpoint"], out_name="rescored.parquet")


def mean_cll(path: str, only_rewritten: bool = False) -> float | None:
    """Mean CLL of a scored corpus's rows (no error, a finite CLL), streamed; only the rows this cycle
    rewrote (`rewritten` true) when asked."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from opsft.data.reader import iter_batches

    total, n = 0.0, 0
    for table in iter_batches(path, ["cll", "error", "rewritten"]):
        cll = table.column("cll")
        if not (pa.types.is_floating(cll.type) or pa.types.is_integer(cll.type)):
            continue
        values = pc.cast(cll, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        keep = np.isfinite(values)
        error = table.column("error")
        if not pa.types.is_null(error.type):
            keep &= ~pc.fill_null(pc.greater(pc.utf8_length(pc.cast(error, pa.string())), 0), False).to_numpy(
                zero_copy_only=False)
        if only_rewritten:
            flag = table.column("rewritten")
            keep &= pc.fill_null(pc.cast(flag, pa.bool_()), False).to_numpy(zero_copy_only=False) \
                if pa.types.is_boolean(flag.type) else np.zeros(len(values), dtype=bool)
        total += float(values[keep].sum())
        n += int(keep.sum())
    return total / n if n else None


def run_report(cycle: Cycle, folder: Path, state: dict) -> dict:
    from opsft.report import build_report

    scored, rescored = data_path(folder, state, "scored.parquet"), data_path(folder, state, "rescored.parquet")
    maybe_crash("report")
    report = data_path(folder, state, "report")
    summary = build_report([("before", scored), ("after", rescored)], report)  # streamed: flat memory
    compact = {
        "cll_before": mean_cll(scored), "cll_after": mean_cll(rescored),
        "rewritten_cll_before": mean_cll(data_path(folder, state, "selected.parquet")),
        "rewritten_cll_after": mean_cll(rescored, only_rewritten=True),
        "sources": state["outputs"]["merge"]["sources"],
        "training": state["outputs"]["train"].get("final_metrics"),
    }
    write_text_atomic(storage.join(report, "cycle.json"), json.dumps(compact, indent=2, default=str))
    return {"folder": report, **compact, "separation": summary.get("pairs")}


RETRY_STATUSES = (429, 502, 503, 504)  # the service is busy, restarting or behind a proxy that is


class PromoteError(RuntimeError):
    """The scoring service refused the promotion, or stayed unreachable through every try."""


def _promote_retryable(exc: BaseException) -> bool:
    """A transient failure: 429/502/503/504, a connection refused/reset/dropped, a timeout."""
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in RETRY_STATUSES
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    return isinstance(exc, ConnectionError | TimeoutError)


def _http_detail(exc) -> str:
    try:
        body = exc.read()[:2000]
        return str(json.loads(body).get("detail", body.decode(errors="replace")))
    except Exception:  # noqa: BLE001 - the detail is a courtesy; the status code says what happened
        return exc.reason if isinstance(exc.reason, str) else ""


def _retry_after(exc) -> float | None:
    value = exc.headers.get("Retry-After") if getattr(exc, "headers", None) is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def post_reload(url: str, model: str, token: str | None, *, timeout_s: float, attempts: int, backoff_s: float,
                backoff_max_s: float, sleep: Callable[[float], None] = time.sleep) -> dict:
    """POST {"model": model} to `url` (a service's /v1/models/reload). Transient failures
    (_promote_retryable) are tried again, up to `attempts` in all, waiting backoff_s, then twice as
    long each time (at most backoff_max_s; a Retry-After within that cap is honoured); any other
    failure (400, 401, 403, 422, 500, ...) raises PromoteError at once. A reload repeats safely: the
    service loads the same checkpoint again."""
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return {"url": url, "status": response.status, "answer": json.loads(response.read() or b"{}"),
                        "attempts": attempt}
        except Exception as exc:
            http = isinstance(exc, urllib.error.HTTPError)
            what = f"HTTP {exc.code}: {_http_detail(exc)}" if http else f"{type(exc).__name__}: {exc}"
            if not _promote_retryable(exc):
                raise PromoteError(f"POST {url}: {what} (not retried)") from exc
            if attempt == attempts:
                raise PromoteError(f"POST {url}: {what} (gave up after {attempts} tries)") from exc
            wait = min(backoff_s * 2 ** (attempt - 1), backoff_max_s)
            hinted = _retry_after(exc) if http else None
            if hinted is not None:
                wait = min(max(wait, hinted), backoff_max_s)
            log.warning("promote: POST %s: %s; try %d of %d in %.1f s", url, what, attempt + 1, attempts, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def run_promote(cycle: Cycle, folder: Path, state: dict) -> dict:
    cfg = cycle.cfg
    url = cfg.promote_url.rstrip("/") + "/v1/models/reload"
    token = os.environ.get(cfg.promote_api_key_env or "", "")
    maybe_crash("promote")
    return post_reload(url, state["outputs"]["train"]["checkpoint"], token or None, timeout_s=cfg.promote_timeout_s,
                       attempts=cfg.promote_attempts, backoff_s=cfg.promote_backoff_s,
                       backoff_max_s=cfg.promote_backoff_max_s)


def default_runners() -> dict[str, Callable]:
    return {"score": run_score, "select": run_select, "rewrite": run_rewrite, "merge": run_merge,
            "train": run_train, "rescore": run_rescore, "report": run_report, "promote": run_promote}
