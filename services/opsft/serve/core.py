"""What a scorer replica does with requests, without Ray: tokenise a request's items once (an item
the model cannot score answers 422 before the request joins a batch), and score several requests
in one engine call (opsft.scoring.score_encoded: the same code `opsft score` runs, so the numbers
are the same up to the float noise of batched matmuls).

A request ("job") is answered either {"results": [...]} or {"status": 4xx, "detail": why}. An
engine that fails (opsft.faults: an engine fault) is never a 4xx: `score_jobs_guarded` raises
EngineFault, and the replica answers 503 and asks to be replaced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# opsft.scoring (and so torch) is imported where it is used: the HTTP ingress imports this
# module for Job only and holds no model.


@dataclass(frozen=True)
class Job:
    """One HTTP request's items (as corpus rows) and its options."""

    rows: list[dict]
    include_eos: bool = False
    return_tokens: bool = False
    encoded: tuple | None = None  # (the engine that tokenised them, rows with ids, [(index, Encoded)]): prepare_job


def item_error(i: int, message: str) -> dict:
    return {"status": 422, "detail": f"items[{i}]: {message}"}


def prepare_job(engine, job: Job) -> tuple[Job, dict | None]:
    """(the job with its items tokenised by this engine, None), or (job, a 422 answer naming the first item
    the model cannot score: no response token, too long, bad chat). Costs a tokenisation, no forward pass;
    score_jobs reuses it (a job tokenised by another engine, before a reload, is tokenised again)."""
    from opsft.scoring import encode_rows

    out, encoded = encode_rows(job.rows, engine, job.include_eos)
    bad = next((i for i, row in enumerate(out) if row.get("error")), None)
    if bad is not None:
        return job, item_error(bad, out[bad]["error"])
    return replace(job, encoded=(engine, out, encoded)), None


def token_table(tokenizer, row: dict) -> list[dict]:
    ids = row["token_ids"]
    texts = tokenizer.batch_decode([[t] for t in ids])
    return [{"id": int(t), "token": text, "logprob": lp, "entropy": ent, "phi": lp + ent}
            for t, text, lp, ent in zip(ids, texts, row["token_logprob"], row["token_entropy"], strict=True)]


def answer_row(tokenizer, row: dict, return_tokens: bool) -> dict:
    from opsft.scoring import SCORE_FIELDS

    out = {"id": str(row["id"]), **{name: row[name] for name in SCORE_FIELDS}}
    if return_tokens:
        out["tokens"] = token_table(tokenizer, row)
    return out


def score_jobs(engine, jobs: list[Job], temperature: float = 1.0) -> list[dict]:
    """Answers for several jobs, scoring all their rows together (one engine call per include_eos
    setting; the engine batches rows by length inside). Each job's items are tokenised once: by
    prepare_job, or here when it did not run on this engine."""
    from opsft.scoring import encode_rows, score_encoded

    answers: list[dict | None] = [None] * len(jobs)
    for include_eos in (False, True):
        group = [k for k, job in enumerate(jobs) if job.include_eos == include_eos]
        if not group:
            continue
        rows, encoded = [], []
        for k in group:
            job = jobs[k]
            mine = job.encoded if job.encoded is not None and job.encoded[0] is engine else \
                (engine, *encode_rows(job.rows, engine, include_eos))
            encoded += [(len(rows) + i, enc) for i, enc in mine[2]]
            rows += [dict(row) for row in mine[1]]
        details = any(jobs[k].return_tokens for k in group)
        scored = score_encoded(rows, encoded, engine, temperature=temperature, token_details=details)
        offset = 0
        for k in group:
            mine = scored[offset: offset + len(jobs[k].rows)]
            offset += len(jobs[k].rows)
            bad = next(((i, r["error"]) for i, r in enumerate(mine) if r.get("error")), None)
            if bad is not None:
                answers[k] = item_error(*bad)
            else:
                answers[k] = {"results": [answer_row(engine.tokenizer, r, jobs[k].return_tokens) for r in mine]}
    return answers  # type: ignore[return-value]


def score_jobs_guarded(guard, jobs: list[Job], temperature: float = 1.0) -> list[dict]:
    """score_jobs on guard.engine (an opsft.faults.Guard) with its rules: a failure the engine is to
    blame for raises EngineFault (no answer is a 4xx then); otherwise each job is scored alone, and a
    job that still fails alone on a healthy engine is answered 422, naming the cause."""
    from opsft.faults import describe

    try:
        return score_jobs(guard.engine, jobs, temperature)
    except Exception as exc:  # noqa: BLE001 - the engine's fault (raised again) or one request's
        guard.blame(exc)
    answers = []
    for job in jobs:
        try:
            answers += score_jobs(guard.engine, [job], temperature)
        except Exception as exc:  # noqa: BLE001
            guard.blame(exc)
            answers.append({"status": 422, "detail": f"the model cannot score this request: {describe(exc)}"})
    return answers
