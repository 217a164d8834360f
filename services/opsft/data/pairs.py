"""Preference pairs for DPO / SimPO (opsft.method.preference): the row format, its validation, and
the builder that turns the output of `opsft rewrite` (policy self-first) into pairs.

A pair row: `prompt` (string) or `messages` (chat list ending with a user turn), `chosen` and
`rejected` (non-empty strings, different), optional `id`; other columns are carried along and
ignored by training. Both responses answer the same prompt.

    pairs, counts = preference_pairs(rewritten_rows)     # rows of opsft.recipe.rewrite_rows
    write_rows(pairs, "pairs.jsonl")
    messages, chosen, rejected = parse_pair(pairs[0])    # raises RowError on a bad row
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from opsft.data.corpus import RowError, check_answer, check_text, row_messages, with_id

# why a rewrite row makes no pair, in the order they are checked
SKIP_REASONS = ("error", "bad_answer", "self_correct", "self_unjudged", "empty_self_response", "no_chosen",
                "same_text", "too_long")


def parse_pair(row: dict) -> tuple[list[dict], str, str]:
    """(messages, chosen, rejected) of a pair row; raises RowError saying what is wrong."""
    if row.get("error"):
        raise RowError(str(row["error"]))
    messages = row_messages(row)
    out = []
    for side in ("chosen", "rejected"):
        text = row.get(side)
        if text is None:
            raise RowError(f"row has no '{side}' (a pair row needs prompt|messages, chosen, rejected)")
        text = check_text(text, side)
        if not text.strip():
            raise RowError(f"'{side}' is empty")
        out.append(text)
    if out[0].strip() == out[1].strip():
        raise RowError("'chosen' and 'rejected' are the same text")
    return messages, out[0], out[1]


def is_rewrite_output(rows: list[dict]) -> bool:
    """Rows written by `opsft rewrite` (they carry self_verified) rather than pair rows."""
    return bool(rows) and not any("chosen" in r for r in rows) and any("self_verified" in r for r in rows)


def preference_pairs(rows: Iterable[dict], fits: Callable[[dict], bool] | None = None) -> tuple[list[dict], dict]:
    """(pair rows, counts) from `opsft rewrite` output rows (policy self-first): the rows of
    pair_rows that are pairs, and the counts of all rows."""
    counts = empty_counts()
    pairs = [row for row in pair_rows(rows, counts, fits) if "no_pair" not in row]
    return pairs, counts


def empty_counts() -> dict:
    return {"rows": 0, "pairs": 0, **{reason: 0 for reason in SKIP_REASONS}}


def pair_rows(rows: Iterable[dict], counts: dict | None = None,
              fits: Callable[[dict], bool] | None = None) -> Iterator[dict]:
    """One output row per `opsft rewrite` output row (policy self-first), in order: a pair, or a row
    that says why there is none (`no_pair`: the reason, and `error`: "no pair: ...", so training
    counts and skips it). `counts` (rows, pairs, one count per reason) is updated as rows go by;
    `fits(pair)` says whether a pair fits the model (else `too_long`).

    For each row, in this order:
      - a row with `error` (reason `error`), or an `answer` that is not a string or a number
        (`bad_answer`);
      - `self_verified` True: the model already answers correctly, no rejected side
        (`self_correct`);
      - `self_verified` None or absent (no reference answer to judge by, or policy hd-all, which
        does not ask the model first) (`self_unjudged`);
      - `self_verified` False with an empty `self_response` (`empty_self_response`);
      - otherwise rejected = `self_response` (the model's own wrong greedy answer) and chosen =
        `response` when `verified` is True (a verified hinted-decoding rewrite; source hd), else
        `original_response` (the corpus's reference solution: source original, including rows
        drop_unverified marked `dropped`, and hd rows whose answer could not be checked);
        no chosen text (`no_chosen`), chosen equal to rejected (`same_text`), a prompt with either
        side longer than the model takes (`too_long`).
    A row keeps the row's id, prompt or messages, and answer when present; a pair adds `chosen`,
    `rejected` and `chosen_source` (hd | original)."""
    counts = counts if counts is not None else empty_counts()
    for row in rows:
        counts["rows"] += 1
        reason, out = _pair_of(row)
        if reason is None and fits is not None and not fits(out):
            reason = "too_long"
        if reason is None:
            counts["pairs"] += 1
            yield out
            continue
        counts[reason] += 1
        why = out.pop("row_error", None) or _WHY[reason]
        yield {**out, "no_pair": reason, "error": f"no pair: {why}"}


_WHY = {"error": "the row has an error", "bad_answer": "its answer is not a string or a number",
        "self_correct": "the model's own answer is right", "self_unjudged": "the model's own answer was not judged",
        "empty_self_response": "the model's own answer is empty", "no_chosen": "no chosen text",
        "same_text": "chosen and rejected are the same text", "too_long": "longer than the model takes"}


def _base(row: dict) -> dict:
    row = with_id(row)
    out = {"id": row["id"]}
    for key in ("messages", "prompt", "answer"):
        if row.get(key) is not None:
            out[key] = row[key]
    return out


def _pair_of(row: dict) -> tuple[str | None, dict]:
    base = _base(row)
    if row.get("error"):
        return "error", {**base, "row_error": str(row["error"])}
    try:
        check_answer(row)
    except RowError:
        base.pop("answer", None)
        return "bad_answer", base
    verdict = row.get("self_verified")
    if verdict is True:
        return "self_correct", base
    if verdict is not False:
        return "self_unjudged", base
    rejected = row.get("self_response")
    if not isinstance(rejected, str) or not rejected.strip():
        return "empty_self_response", base
    if row.get("verified") is True:
        chosen, source = row.get("response"), row.get("source") or "hd"
    else:
        chosen, source = row.get("original_response"), "original"
    if not isinstance(chosen, str) or not chosen.strip():
        return "no_chosen", base
    if chosen.strip() == rejected.strip():
        return "same_text", base
    return None, {**base, "chosen": chosen, "rejected": rejected, "chosen_source": source}
