"""What a scorer replica does with requests, without Ray: check items against the model's
tokenizer, and score several requests in one call of opsft.scoring.score_rows (the same code
`opsft score` runs, so the numbers are the same up to the float noise of batched matmuls).

A request ("job") is answered either {"results": [...]} or {"status": 4xx, "detail": why}. An
engine that fails (opsft.faults: an engine fault) is never a 4xx: `score_jobs_guarded` raises
EngineFault, and the replica answers 503 and asks to be replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsft.data.chat import encode
from opsft.data.corpus import RowError, parse_row

# opsft.scoring (and so torch) is imported where it is used: the HTTP ingress imports this
# module for Job only and holds no model.


@dataclass(frozen=True)
class Job:
    """One HTTP request's items (as corpus rows) and its options."""

    rows: list[dict]
    include_eos: bool = False
    return_tokens: bool = False


def item_error(i: int, message: str) -> dict:
    return {"status": 422, "detail": f"items[{i}]: {message}"}


def check_job(engine, job: Job) -> dict | None:
    """A 422 answer for the first item the model cannot score (no response token, too long,
    bad chat), else None. Costs a tokenization, no forward pass."""
    for i, row in enumerate(job.rows):
        try:
            ex = parse_row(row)
            encode(engine.tokenizer, ex.messages, ex.response, job.include_eos, engine.max_length)
        except RowError as exc:
            return item_error(i, str(exc))
    return None


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
    """Answers for several jobs, scoring all their rows together (one score_rows call per
    include_eos setting; the engine batches rows by length inside)."""
    from opsft.scoring import score_rows

    answers: list[dict | None] = [None] * len(jobs)
    for include_eos in (False, True):
        group = [k for k, job in enumerate(jobs) if job.include_eos == include_eos]
        if not group:
            continue
        rows = [row for k in group for row in jobs[k].rows]
        details = any(jobs[k].return_tokens for k in group)
        scored = score_rows(rows, engine, include_eos, temperature=temperature, token_details=details)
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
