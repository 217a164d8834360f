"""Scoring corpus rows with CLL: rows in, rows out (same order, same count, extra fields).

Engine-agnostic and Ray-free: `opsft score` calls it in-process, the Ray Data job calls it
on each batch inside an actor, and the HTTP service calls it per request.
"""

from __future__ import annotations

from opsft.data.chat import encode
from opsft.data.corpus import RowError, parse_row, with_id
from opsft.method.cll import summarize
from opsft.score_columns import SCORE_FIELDS  # noqa: F401 - the score fields (opsft.score_columns)


def empty_scores(error: str | None, tokens: bool = False) -> dict:
    out = {name: None for name in SCORE_FIELDS}
    out["error"] = error
    if tokens:
        out["token_phi"] = None
    return out


def encode_rows(rows: list[dict], engine, include_eos: bool = False,
                tokens: bool = False) -> tuple[list[dict], list[tuple[int, object]]]:
    """The tokenisation half of score_rows: (copies of the rows with ids, [(index, its Encoded)] of every row
    the engine can score); a row it cannot score gets `error` and null statistics here."""
    out = [with_id(dict(row)) for row in rows]
    encoded = []
    for k, row in enumerate(out):
        try:
            ex = parse_row(row)
            encoded.append((k, encode(engine.tokenizer, ex.messages, ex.response, include_eos, engine.max_length)))
        except RowError as exc:
            row.update(empty_scores(str(exc), tokens))
    return out, encoded


def score_encoded(out: list[dict], encoded: list[tuple[int, object]], engine, tokens: bool = False,
                  temperature: float = 1.0, token_details: bool = False) -> list[dict]:
    """The scoring half of score_rows: one engine call over every encoded row; returns `out` with their
    statistics added."""
    if encoded:
        scores = engine.score_tokens([e.input_ids for _, e in encoded], [e.response_start for _, e in encoded],
                                     temperature)
        for (k, enc), sc in zip(encoded, scores, strict=True):
            stats = summarize(sc.logprob, sc.entropy).as_dict()
            stats.update(exact_entropy=bool(sc.exact_entropy), error=None)
            if tokens:
                stats["token_phi"] = [float(x) for x in sc.logprob + sc.entropy]
            if token_details:
                stats.update(token_ids=enc.input_ids[enc.response_start:], token_logprob=sc.logprob.tolist(),
                             token_entropy=sc.entropy.tolist())
            out[k].update(stats)
    return out


def score_rows(rows: list[dict], engine, include_eos: bool = False, tokens: bool = False,
               temperature: float = 1.0, token_details: bool = False) -> list[dict]:
    """Each row with its CLL statistics added; invalid rows get `error` and null statistics.
    `token_details` also adds the response's `token_ids`, `token_logprob` and `token_entropy`
    (lists; set on scored rows only), e.g. for the HTTP API's per-token answer."""
    out, encoded = encode_rows(rows, engine, include_eos, tokens)
    return score_encoded(out, encoded, engine, tokens, temperature, token_details)


SUMMARY_COLUMNS = ["error", "cll", "cll_sum", "n_tokens", "cll_frac_pos"]


def summary(rows) -> dict:
    """Corpus-level figures: rows, error rows, token-weighted and row-mean CLL. `rows`: any
    iterable (one pass; the Ray job streams its output's SUMMARY_COLUMNS through it)."""
    n = ok = n_tok = 0
    cll = cll_sum = frac = 0.0
    for r in rows:
        n += 1
        if r.get("error") or r.get("cll") is None:
            continue
        ok += 1
        n_tok += r["n_tokens"]
        cll, cll_sum, frac = cll + r["cll"], cll_sum + r["cll_sum"], frac + r["cll_frac_pos"]
    return {
        "rows": n,
        "error_rows": n - ok,
        "tokens": n_tok,
        "cll_mean": cll / ok if ok else None,
        "cll_token_mean": cll_sum / n_tok if n_tok else None,
        "cll_frac_pos_mean": frac / ok if ok else None,
    }
