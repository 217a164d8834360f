"""The on-policy data recipe (the paper's pipeline): rewrite an off-policy corpus into the
model's own distribution while keeping its answers right. Rows in, rows out; Ray-free.

Policy `self-first` (default):
  1. the model answers every question itself (greedy); an answer the verifier accepts is kept
     as it is (`source` = self: it is already on-policy);
  2. the other rows go through Hinted Decoding: a greedy "# Analyze ... # CoT" hint that stops at
     its first "# CoT" marker (or at a "# Question"/"# Answer" header: a new example the model
     started); the analysis before it, then the marker line "# CoT:" (hint_cut="line"; "marker"
     = "# CoT" alone, the official rule), opens the hinted stream (opsft.data.hints.hint_prefix).
     No marker or no analysis: by default the stream opens at the marker line anyway, after the
     analysis if there is one (`hint_forced` = true); with missing_hint="skip", the official
     rule, finish reason `no_hint`. Then opsft.method.hinted.hinted_decode, with eos held until
     the output has content and a stop at any hint header it writes (OUTPUT_STOPS);
  3. an HD output that ended by itself (eos, or a header stop: the text before it) and that the
     verifier accepts replaces the response (`source` = hd); otherwise (wrong, empty, cut at
     max_length, repeating, out of step) the row keeps its original response (`source` =
     original, `verified` = false), or, with drop_unverified, is marked `dropped` = true
     (split_dropped separates them; nothing is lost). A self-answer is kept only if it ended too.
Policy `hd-all`: step 2 and 3 for every row.

Each output row: `response` (the new one), `original_response`, `source`, `verified`,
`finish_reason`, `hint` (the model's hint output), `hd_response` (the HD text, kept or not),
`hd_tokens`, `cll` and `cll_original`
(mean phi of the new / original response under the plain model), and with self-first
`self_response` / `self_verified` (the model's own greedy answer and its verdict: the rejected
side of a preference pair when it is wrong). The reference answer is the
row's `answer`, else the final answer extracted from its original response. Invalid rows get
`error` (corpus rules) and null fields.

    rows = rewrite_rows(rows, engine, RewriteParams(policy="self-first"))        # rows out == rows in
    rows = rewrite_rows(rows, engine, params={"beta": 3.0, "policy": "hd-all"})  # flat fields, as in RewriteConfig
    kept, dropped = split_dropped(rows)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from opsft.data.chat import TokenText, end_of_turn_id, prompt_ids, response_ids
from opsft.data.corpus import RowError, check_answer, parse_row, question_text, with_id
from opsft.data.hints import HINT_STOPS, cut_at_stop, hint_messages, hint_prefix, marker_line
from opsft.data.verify import extract_final_answer, make_verifier
from opsft.engines.base import GenerationParams, can_decode
from opsft.method.hinted import hinted_decode
from opsft.method.hinted_params import HDItem
from opsft.recipe_plan import STAGE_NEEDS, STAGES, RewriteParams, stages_for
from opsft.scoring import score_rows

ENDED = ("eos", "stop")  # finish reasons of an output that ended by itself (the only ones accepted)
# Hinted-decoding outcomes counted in the summary: finish reason -> the summary's name
OUTCOMES = {"eos": "eos", "stop": "stop", "no_hint": "no_hint", "empty": "empty", "out_of_step": "out_of_step",
            "max_length": "max_length", "repeating": "repetition"}
NEW_FIELDS = ("original_response", "source", "verified", "finish_reason", "hint", "hd_response", "hd_tokens", "cll",
              "cll_original", "self_response", "self_verified", "hint_forced")


Report = Callable[[str, int, int], None]  # (stage, done, total)


def row_seed(row_id) -> int:
    """A sampling seed from a row's id: the same row samples the same tokens in any batch."""
    return int(hashlib.sha256(str(row_id).encode()).hexdigest()[:8], 16)


def _finish(tokens: list[int], eos: int) -> str:
    return "eos" if tokens and tokens[-1] == eos else "max_length"


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


# A row's progress through the stages (opsft.recipe_plan.STAGES) lives in the row itself: its new fields,
# and until the last stage a private `_rewrite` dict (its reference answer and the self-answer's finish reason).
PRIVATE = "_rewrite"


@dataclass
class Rewrite:
    """One stage call: its output rows (updated in place) and what the stage functions share."""

    out: list[dict]
    engine: object  # None for the CPU stages
    params: RewriteParams
    verifier: Callable
    report: Report

    @property
    def tok(self):
        return self.engine.tokenizer

    @property
    def eos(self) -> int:
        return end_of_turn_id(self.tok)

    def pending(self) -> list[int]:
        """Rows that are valid and not yet decided (no source yet)."""
        return [k for k, row in enumerate(self.out)
                if PRIVATE in row and row.get("source") is None and not row.get("error")]

    def question(self, k: int) -> list[int]:
        return prompt_ids(self.tok, parse_row(self.out[k]).messages)

    def accept(self, text: str, k: int) -> bool | None:
        """The verifier's verdict on `text` for row k (None when the row has no reference)."""
        reference = self.out[k][PRIVATE]["reference"]
        return None if reference is None else bool(self.verifier(text, reference, self.out[k]))

    def keep_original(self, k: int, finish_reason: str, **fields) -> None:
        self.out[k].update(source="original", verified=False, finish_reason=finish_reason, **fields)


def _params(params: RewriteParams | dict | None) -> RewriteParams:
    return params if isinstance(params, RewriteParams) else RewriteParams.from_fields(dict(params or {}))


def rewrite_rows(rows: list[dict], engine, params: RewriteParams | dict | None = None, verifier=None,
                 hd_engine=None, report: Report | None = None, engines: dict | None = None) -> list[dict]:
    """Every row rewritten per the policy, in input order (rows out == rows in): the stages of
    `stages_for(policy)` one after the other, in this process.

    engine: generates the self-answers and hints and scores CLL (opsft.engines);
    params: RewriteParams, or its flat fields (RewriteParams.from_fields);
    verifier: a callable (default: params.verifier);
    hd_engine: the engine that runs hinted decoding (the decode capability; default: engine);
    engines: {stage: engine} for any engine stage (wins over engine / hd_engine)."""
    params = _params(params)
    chosen = {stage: engine for stage, need in STAGE_NEEDS.items() if need is not None}
    if hd_engine is not None:
        chosen["hinted-decoding"] = hd_engine
    chosen.update(engines or {})
    if not can_decode(chosen["hinted-decoding"]):
        raise ValueError(f"hinted decoding needs an engine that can decode (hf, vllm); engine "
                         f"{getattr(chosen['hinted-decoding'], 'name', '?')!r} cannot: pass hd_engine")
    verifier = verifier or make_verifier(params.verifier)
    for i, stage in enumerate(stages_for(params.policy)):
        rows = rewrite_stage(rows, chosen.get(stage), stage, params, first=i == 0, verifier=verifier, report=report)
    return rows


def rewrite_stage(rows: list[dict], engine, stage: str, params: RewriteParams | dict | None = None,
                  first: bool = False, verifier=None, report: Report | None = None) -> list[dict]:
    """One stage of the recipe over a batch of rows (copies; rows out == rows in). `first`: the
    rows come from the corpus (the first stage adds the new fields and checks each row); the
    last stage (score) removes the private state. `engine` is None for the CPU stages."""
    if stage not in STAGES:
        raise ValueError(f"unknown rewrite stage {stage!r} (stages: {', '.join(STAGES)})")
    params = _params(params)
    out = [dict(row) for row in rows]
    if first:
        _prepare(out, engine)
    job = Rewrite(out, engine, params, verifier or make_verifier(params.verifier),
                  report or (lambda stage, done, total: None))
    _STAGE_FUNCTIONS[stage](job)
    return out


def _prepare(out: list[dict], engine) -> None:
    """Rows fresh from the corpus: ids, the new fields (None), and for each valid row its private
    state; an invalid row gets its `error` here and is left alone by the stages."""
    for k, row in enumerate(out):
        row = out[k] = with_id(row)
        row.pop(PRIVATE, None)
        row.update({name: None for name in NEW_FIELDS})
        row["original_response"] = row.get("response")
        try:
            ex = parse_row(row)
            check_answer(row)
            question = prompt_ids(engine.tokenizer, ex.messages)
            if len(question) >= engine.max_length:
                raise RowError(f"too long for the model: the prompt has {len(question)} tokens >= max length "
                               f"{engine.max_length}")
        except RowError as exc:
            row["error"] = str(exc)
            continue
        reference = row.get("answer")
        if reference in (None, ""):
            reference = extract_final_answer(ex.response)
        row[PRIVATE] = {"reference": reference}


def _self_answers(job: Rewrite) -> None:
    """Stage self-answer (self-first): the model's greedy answer to each row's question."""
    rows = job.pending()
    if not rows:
        return
    job.report("self-answer", 0, len(rows))
    gen = GenerationParams(max_new_tokens=job.params.hd.max_new_tokens, temperature=0.0,
                           stop_token_ids=(job.eos,), seed=job.params.hd.seed)
    answers = job.engine.generate([job.question(k) for k in rows], gen)
    for k, tokens in zip(rows, answers, strict=True):
        job.out[k]["self_response"] = _text(job.tok, tokens)
        job.out[k][PRIVATE]["self_finish"] = _finish(tokens, job.eos)
    job.report("self-answer", len(rows), len(rows))


def _verify_self(job: Rewrite) -> None:
    """Stage verify-self (CPU): a self-answer the verifier accepts becomes the response (source
    self: it is already on-policy); the other rows go on to the hint."""
    for k in job.pending():
        row = job.out[k]
        if row.get("self_response") is None:
            continue
        verdict = job.accept(row["self_response"], k)
        row["self_verified"] = verdict
        if verdict and row[PRIVATE].get("self_finish") == "eos":  # an answer cut at max_length is not kept
            row.update(response=row["self_response"], source="self", verified=True,
                       finish_reason=row[PRIVATE].get("self_finish"))


def _hd_item(job: Rewrite, k: int, hint_prompt: list[int] | None = None) -> HDItem | None:
    """Row k's hinted-decoding item from its hint (hinted prompt = question + reference + the
    hint's analysis prefix; student prompt = the question); None when the hint has no usable
    analysis and missing_hint is "skip"."""
    row = job.out[k]
    if job.params.hint_prompt == "direct":
        prefix = marker_line(job.params.hint_cut)
    else:
        prefix, _ = hint_prefix(row["hint"], job.params.hint_cut, job.params.missing_hint,
                                row[PRIVATE].get("hint_ended", True))
    if prefix is None:
        return None
    hint_prompt = hint_prompt if hint_prompt is not None else _hint_prompt(job, k)
    return HDItem(hinted_prompt=hint_prompt + response_ids(job.tok, prefix), student_prompt=job.question(k),
                  seed=row_seed(row["id"]))


def _hint_prompt(job: Rewrite, k: int) -> list[int]:
    ex = parse_row(job.out[k])
    return prompt_ids(job.tok, hint_messages(question_text(ex.messages), ex.response, job.params.hint_prompt))


def _hints(job: Rewrite) -> None:
    """Stage hint: each row's greedy "# Analyze ... # CoT" hint. A row without a usable hint, or
    with no room left for hinted decoding, keeps its original response."""
    rows = job.pending()
    if not rows:
        return
    job.report("hint", 0, len(rows))
    hint_prompts = {k: _hint_prompt(job, k) for k in rows}
    for k in [k for k, hp in hint_prompts.items() if len(hp) >= job.engine.max_length]:  # no room for a hint
        job.keep_original(k, "max_length", hd_tokens=0)
        del hint_prompts[k]
    if job.params.hint_prompt == "direct":  # nothing to generate: the hinted stream opens at the marker line
        hints = [[] for _ in hint_prompts]
    else:
        hints = job.engine.generate(list(hint_prompts.values()), GenerationParams(
            max_new_tokens=job.params.hint_max_new_tokens, temperature=0.0,
            stop_token_ids=(job.eos,), stop_strings=HINT_STOPS)) if hint_prompts else []
    for (k, hp), hint in zip(hint_prompts.items(), hints, strict=True):
        row = job.out[k]
        row["hint"] = job.tok.decode(hint, skip_special_tokens=True)
        # a hint that ended by itself: an end-of-turn token, or a stop string (its marker, a header)
        ended = row[PRIVATE]["hint_ended"] = bool(hint) and hint[-1] == job.eos or len(hint) < \
            job.params.hint_max_new_tokens
        row["hint_forced"] = job.params.hint_prompt == "analyze" and \
            hint_prefix(row["hint"], job.params.hint_cut, job.params.missing_hint, ended)[1]
        item = _hd_item(job, k, hp)
        if item is None:
            job.keep_original(k, "no_hint")
        elif max(len(item.hinted_prompt), len(item.student_prompt)) >= job.engine.max_length:
            job.keep_original(k, "max_length", hd_tokens=0)
    job.report("hint", len(rows), len(rows))


class TokenProgress:
    """Reports hinted-decoding progress every 256 generated tokens (an upper bound as total)."""

    def __init__(self, report: Report, total: int):
        self.report, self.total, self.done = report, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done % 256 < n:
            self.report("hinted-decoding tokens (upper bound)", self.done, self.total)


def _hinted_decoding(job: Rewrite) -> None:
    """Stage hinted-decoding, in batches of params.batch_size items, on an engine that can decode."""
    rows = job.pending()
    if not rows:
        return
    tok, params = job.tok, job.params
    items = [_hd_item(job, k) for k in rows]
    decode_token, tick = TokenText(tok), TokenProgress(job.report, len(items) * params.hd.max_new_tokens)
    native = getattr(job.engine, "hinted_decode", None)  # an engine that schedules both streams itself (vllm)
    step = len(items) if native else params.batch_size
    decode = native or partial(hinted_decode, job.engine)
    for s in range(0, len(items), step):
        results = decode(items[s:s + step], params.hd, {job.eos}, decode_token=decode_token,
                         max_positions=job.engine.max_length, on_token=tick)
        for k, res in zip(rows[s:s + step], results, strict=True):
            text = cut_at_stop(_text(tok, res.tokens), params.hd.stop_strings).strip()
            empty = not text and res.finish_reason != "out_of_step"
            job.out[k].update(hd_response=text, hd_tokens=len(res.tokens),
                              finish_reason="empty" if empty else res.finish_reason)
    job.report("hinted-decoding", len(items), len(items))


def _verify_hd(job: Rewrite) -> None:
    """Stage verify (CPU): a hinted-decoding output that ended by itself (ENDED) and that the
    verifier accepts (or cannot judge) becomes the response (source hd); otherwise the row keeps
    its original response."""
    for k in job.pending():
        row = job.out[k]
        text = row.get("hd_response")
        if text is None:
            continue
        verdict = job.accept(text, k) if text and row.get("finish_reason") in ENDED else False
        if verdict is False:
            row.update(source="original", verified=False)
        else:
            row.update(response=text, source="hd", verified=verdict)


def _score(job: Rewrite) -> None:
    """Stage score: CLL of the new and the original response under the plain model; with
    drop_unverified, rows that kept their original response are marked `dropped`."""
    valid = [k for k, row in enumerate(job.out) if row.pop(PRIVATE, None) is not None and not row.get("error")]
    _add_cll(job.out, valid, job.engine)
    if job.params.drop_unverified:
        for row in job.out:
            row["dropped"] = row["source"] == "original" and row["verified"] is False


_STAGE_FUNCTIONS = {"self-answer": _self_answers, "verify-self": _verify_self, "hint": _hints,
                    "hinted-decoding": _hinted_decoding, "verify": _verify_hd, "score": _score}


def split_dropped(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows to write, rows dropped by drop_unverified)."""
    return [r for r in rows if not r.get("dropped")], [r for r in rows if r.get("dropped")]


def _add_cll(out: list[dict], valid: list[int], engine) -> None:
    if not valid:
        return
    probes = []
    for k in valid:
        base = {key: out[k].get(key) for key in ("prompt", "messages") if out[k].get(key) is not None}
        probes.append({**base, "id": "new", "response": out[k]["response"]})
        probes.append({**base, "id": "orig", "response": out[k]["original_response"]})
    scored = score_rows(probes, engine)
    for j, k in enumerate(valid):
        out[k]["cll"], out[k]["cll_original"] = scored[2 * j]["cll"], scored[2 * j + 1]["cll"]
        out[k]["exact_entropy"] = scored[2 * j]["exact_entropy"]  # False: the vllm top-k estimate of H


SUMMARY_COLUMNS = ["error", "dropped", "source", "finish_reason", "verified", "cll", "cll_original", "hd_tokens",
                   "hint_forced"]


def recipe_summary(rows) -> dict:
    """Corpus-level figures: sources, finish reasons, verified fraction, mean CLL new vs original,
    and `hinted_decoding`: over the rows that went to hinted decoding, how each ended (OUTCOMES:
    eos, stop, no_hint, empty, out_of_step, max_length, repetition), how many were accepted and how
    many hints were forced (missing_hint "cot"). `rows`: any iterable (one pass; the Ray job
    streams its output's SUMMARY_COLUMNS through it)."""
    n = errors = dropped = verified = 0
    sources, reasons = Counter(), Counter()
    hd = Counter({name: 0 for name in ("rows", "accepted", "forced_hints", *OUTCOMES.values())})
    cll_sum = orig_sum = 0.0
    both = 0
    for r in rows:
        n += 1
        dropped += bool(r.get("dropped"))
        if r.get("error"):
            errors += 1
            continue
        sources[r.get("source")] += 1
        reasons[r.get("finish_reason")] += 1
        if r.get("hd_tokens") is not None or r.get("finish_reason") == "no_hint":
            hd["rows"] += 1
            hd["accepted"] += r.get("source") == "hd"
            hd["forced_hints"] += bool(r.get("hint_forced"))
            hd[OUTCOMES.get(r.get("finish_reason"), r.get("finish_reason"))] += 1
        verified += bool(r.get("verified"))
        if r.get("cll") is not None and r.get("cll_original") is not None:
            both += 1
            cll_sum, orig_sum = cll_sum + r["cll"], orig_sum + r["cll_original"]
    ok = n - errors
    return {
        "rows": n, "error_rows": errors, "dropped": dropped, "sources": dict(sources),
        "finish_reasons": dict(reasons), "verified_fraction": verified / ok if ok else None,
        "cll_mean": cll_sum / both if both else None, "cll_original_mean": orig_sum / both if both else None,
        "hinted_decoding": dict(hd),
    }
