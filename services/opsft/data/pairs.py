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

from opsft.data.corpus import RowError, _check_text, row_messages, with_id

# preference_pairs' skip reasons, in the order they are checked
SKIP_REASONS = ("error", "self_correct", "self_unjudged", "empty_self_response", "no_chosen", "same_text")


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
        text = _check_text(text, side)
        if not text.strip():
            raise RowError(f"'{side}' is empty")
        out.append(text)
    if out[0].strip() == out[1].strip():
        raise RowError("'chosen' and 'rejected' are the same text")
    return messages, out[0], out[1]


def is_rewrite_output(rows: list[dict]) -> bool:
    """Rows written by `opsft rewrite` (they carry self_verified) rather than pair rows."""
    return bool(rows) and not any("chosen" in r for r in rows) and any("self_verified" in r for r in rows)


def preference_pairs(rows: list[dict]) -> tuple[list[dict], dict]:
    """(pair rows, counts) from `opsft rewrite` output rows (policy self-first).

    For each row, in this order:
      - a row with `error` is skipped (counted `error`);
      - `self_verified` True: the model already answers correctly, no rejected side: skipped
        (`self_correct`);
      - `self_verified` None or absent (no reference answer to judge by, or policy hd-all, which
        does not ask the model first): skipped (`self_unjudged`);
      - `self_verified` False with an empty `self_response`: skipped (`empty_self_response`);
      - otherwise rejected = `self_response` (the model's own wrong greedy answer) and chosen =
        `response` when `verified` is True (a verified hinted-decoding rewrite; source hd), else
        `original_response` (the corpus's reference solution: source original, including rows
        drop_unverified marked `dropped`, and hd rows whose answer could not be checked);
        no chosen text: skipped (`no_chosen`); chosen equal to rejected: skipped (`same_text`).
    A pair row keeps the row's id, prompt or messages, and answer when present, and adds
    `chosen_source` (hd | original). counts: rows, pairs, and one count per skip reason."""
    counts = {"rows": len(rows), "pairs": 0, **{reason: 0 for reason in SKIP_REASONS}}
    pairs = []
    for row in rows:
        reason, pair = _pair_of(row)
        if reason:
            counts[reason] += 1
            continue
        pairs.append(pair)
    counts["pairs"] = len(pairs)
    return pairs, counts


def _pair_of(row: dict) -> tuple[str | None, dict | None]:
    if row.get("error"):
        return "error", None
    verdict = row.get("self_verified")
    if verdict is True:
        return "self_correct", None
    if verdict is not False:
        return "self_unjudged", None
    rejected = row.get("self_response")
    if not isinstance(rejected, str) or not rejected.strip():
        return "empty_self_response", None
    if row.get("verified") is True:
        chosen, source = row.get("response"), row.get("source") or "hd"
    else:
        chosen, source = row.get("original_response"), "original"
    if not isinstance(chosen, str) or not chosen.strip():
        return "no_chosen", None
    if chosen.strip() == rejected.strip():
        return "same_text", None
    row = with_id(row)
    pair = {"id": row["id"]}
    for key in ("messages", "prompt", "answer"):
        if row.get(key) is not None:
            pair[key] = row[key]
    pair.update(chosen=chosen, rejected=rejected, chosen_source=source)
    return None, pair
