"""The on-policy data recipe (the paper's pipeline): rewrite an off-policy corpus into the
model's own distribution while keeping its answers right. Rows in, rows out; Ray-free.

Policy `self-first` (default):
  1. the model answers every question itself (greedy); an answer the verifier accepts is kept
     as it is (`source` = self: it is already on-policy);
  2. the other rows go through Hinted Decoding: a greedy "# Analyze ... # CoT" hint, cut after
     its last "# CoT" (no marker: finish reason `no_hint`; or, with missing_hint="cot", the
     hinted stream opened at "# CoT" without an analysis, `hint_forced` = true), then
     opsft.method.hinted.hinted_decode;
  3. an HD output the verifier accepts replaces the response (`source` = hd); otherwise the row
     keeps its original response (`source` = original, `verified` = false), or, with
     drop_unverified, is marked `dropped` = true (split_dropped separates them; nothing is lost).
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
    rows = rewrite_rows(rows, engine, params={"beta": 3.0, "policy": "hd-all"})  # flat RewriteConfig keys
    kept, dropped = split_dropped(rows)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from opsft.data.chat import end_of_turn_id, prompt_ids, response_ids
from opsft.data.corpus import RowError, parse_row, question_text, with_id
from opsft.data.verify import extract_final_answer, make_verifier
from opsft.engines.base import GenerationParams
from opsft.method.hinted import COT_MARKER, HDItem, HDParams, TokenText, analysis_prefix, hint_messages, hinted_decode
from opsft.scoring import score_rows

POLICIES = ("self-first", "hd-all")
NEW_FIELDS = ("original_response", "source", "verified", "finish_reason", "hint", "hd_response", "hd_tokens", "cll",
              "cll_original", "self_response", "self_verified", "hint_forced")


@dataclass(frozen=True)
class RewriteParams:
    policy: str = "self-first"
    hd: HDParams = field(default_factory=HDParams)
    hint_max_new_tokens: int = 512
    missing_hint: str = "skip"    # "skip" (official: finish_reason no_hint) or "cot" (hinted stream opens at "# CoT")
    batch_size: int = 16          # items per hinted-decoding batch
    drop_unverified: bool = False
    verifier: str = "auto"        # opsft.data.verify.make_verifier name

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.missing_hint not in ("skip", "cot"):
            raise ValueError(f"missing_hint must be 'skip' or 'cot', got {self.missing_hint!r}")

    @classmethod
    def from_config(cls, values: dict) -> RewriteParams:
        """From flat RewriteConfig fields (the CLI's config, or the dict a Ray job passes)."""
        from opsft.config import RewriteConfig

        cfg = RewriteConfig.model_validate(values)
        hd = HDParams(beta=cfg.beta, lambda_mode=cfg.lambda_mode, sigmoid_center=cfg.sigmoid_center,
                      piecewise_bounds=tuple(cfg.piecewise_bounds), temperature=cfg.temperature, top_p=cfg.top_p,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, splitter=cfg.splitter or None)
        return cls(policy=cfg.policy, hd=hd, hint_max_new_tokens=cfg.hint_max_new_tokens, batch_size=cfg.batch_size,
                   missing_hint=cfg.missing_hint,
                   drop_unverified=cfg.drop_unverified, verifier=cfg.verifier)


Report = Callable[[str, int, int], None]  # (stage, done, total)


def row_seed(row_id) -> int:
    """A sampling seed from a row's id: the same row samples the same tokens in any batch."""
    return int(hashlib.sha256(str(row_id).encode()).hexdigest()[:8], 16)


def _finish(tokens: list[int], eos: int) -> str:
    return "eos" if tokens and tokens[-1] == eos else "max_length"


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@dataclass(frozen=True)
class Todo:
    """A valid row to rewrite: its example, reference answer (None: unverifiable) and prompt ids."""

    example: object  # opsft.data.corpus.Example
    reference: str | None
    question: list[int]


@dataclass
class Rewrite:
    """One rewrite_rows call: its output rows (updated in place by the stages) and what they share."""

    out: list[dict]
    todo: dict[int, Todo]  # row index -> the row's Todo, for the rows that are valid
    engine: object
    params: RewriteParams
    verifier: Callable
    report: Report

    @property
    def tok(self):
        return self.engine.tokenizer

    @property
    def eos(self) -> int:
        return end_of_turn_id(self.tok)

    def accept(self, text: str, k: int) -> bool | None:
        """The verifier's verdict on `text` for row k (None when the row has no reference)."""
        reference = self.todo[k].reference
        return None if reference is None else bool(self.verifier(text, reference, self.out[k]))

    def keep_original(self, k: int, finish_reason: str, **fields) -> None:
        self.out[k].update(source="original", verified=False, finish_reason=finish_reason, **fields)


def rewrite_rows(rows: list[dict], engine, params: RewriteParams | dict | None = None, verifier=None,
                 hd_model=None, report: Report | None = None) -> list[dict]:
    """Every row rewritten per the policy, in input order (rows out == rows in).

    engine: generates the self-answers and hints and scores CLL (opsft.engines);
    params: RewriteParams, or flat RewriteConfig fields; verifier: a callable (default: params.verifier);
    hd_model: the transformers model for hinted decoding (default: engine.model)."""
    if not isinstance(params, RewriteParams):
        params = RewriteParams.from_config(dict(params or {}))
    model = hd_model if hd_model is not None else getattr(engine, "model", None)
    if model is None:
        raise ValueError("hinted decoding needs a transformers model: pass hd_model or use the hf engine")
    out, todo = _prepare(rows, engine)
    job = Rewrite(out, todo, engine, params, verifier or make_verifier(params.verifier),
                  report or (lambda stage, done, total: None))
    need_hd = _self_answers(job, list(todo)) if params.policy == "self-first" else list(todo)  # 1.
    items, hd_rows = _hint_items(job, need_hd)  # 2.
    _hinted_decoding(job, model, items, hd_rows)  # 3.
    _add_cll(out, list(todo), engine)  # 4. CLL of the new and the original response under the plain model
    if params.drop_unverified:
        for row in out:
            row["dropped"] = row["source"] == "original" and row["verified"] is False
    return out


def _prepare(rows: list[dict], engine) -> tuple[list[dict], dict[int, Todo]]:
    """The output rows (copies with id and the new fields), and the valid rows' Todo; an invalid
    row gets its `error` here and is left alone by the stages."""
    tok = engine.tokenizer
    out = [with_id(dict(row)) for row in rows]
    todo: dict[int, Todo] = {}
    for k, row in enumerate(out):
        row.update({name: None for name in NEW_FIELDS})
        row["original_response"] = row.get("response")
        try:
            ex = parse_row(row)
            question = prompt_ids(tok, ex.messages)
            if len(question) >= engine.max_length:
                raise RowError(f"too long for the model: the prompt has {len(question)} tokens >= max length "
                               f"{engine.max_length}")
        except RowError as exc:
            row["error"] = str(exc)
            continue
        reference = row.get("answer")
        if reference in (None, ""):
            reference = extract_final_answer(ex.response)
        todo[k] = Todo(ex, reference, question)
    return out, todo


def _self_answers(job: Rewrite, rows: list[int]) -> list[int]:
    """Stage 1 (self-first): the model's greedy answer to each row's question; an answer the
    verifier accepts becomes the response (source self). Returns the rows still to rewrite."""
    if not rows:
        return rows
    job.report("self-answer", 0, len(rows))
    gen = GenerationParams(max_new_tokens=job.params.hd.max_new_tokens, temperature=0.0,
                           stop_token_ids=(job.eos,), seed=job.params.hd.seed)
    answers = job.engine.generate([job.todo[k].question for k in rows], gen)
    still = []
    for k, tokens in zip(rows, answers, strict=True):
        text = _text(job.tok, tokens)
        verdict = job.accept(text, k)
        job.out[k].update(self_response=text, self_verified=verdict)
        if verdict:
            job.out[k].update(response=text, source="self", verified=True, finish_reason=_finish(tokens, job.eos))
        else:
            still.append(k)
    job.report("self-answer", len(rows), len(rows))
    return still


def _hint_items(job: Rewrite, rows: list[int]) -> tuple[list[HDItem], list[int]]:
    """Stage 2: each row's greedy hint, cut to its analysis prefix, made a hinted-decoding item
    (hinted prompt = question + reference + analysis; student prompt = the question). A row
    without a usable hint, or with no room left, keeps its original response."""
    if not rows:
        return [], []
    tok, engine, params = job.tok, job.engine, job.params
    job.report("hint", 0, len(rows))
    hint_prompts = {k: prompt_ids(tok, hint_messages(question_text(job.todo[k].example.messages),
                                                     job.todo[k].example.response)) for k in rows}
    for k in [k for k, hp in hint_prompts.items() if len(hp) >= engine.max_length]:  # no room for a hint
        job.keep_original(k, "max_length", hd_tokens=0)
        del hint_prompts[k]
    hints = engine.generate(list(hint_prompts.values()), GenerationParams(
        max_new_tokens=params.hint_max_new_tokens, temperature=0.0, stop_token_ids=(job.eos,))) if hint_prompts else []
    items, hd_rows = [], []
    for (k, hp), hint in zip(hint_prompts.items(), hints, strict=True):
        row = job.out[k]
        row["hint"] = tok.decode(hint, skip_special_tokens=True)
        prefix = analysis_prefix(row["hint"])
        row["hint_forced"] = prefix is None and params.missing_hint == "cot"
        if row["hint_forced"]:
            prefix = COT_MARKER  # no analysis: the hinted stream sees question + reference, then "# CoT"
        if prefix is None:
            job.keep_original(k, "no_hint")
            continue
        item = HDItem(hinted_prompt=hp + response_ids(tok, prefix), student_prompt=job.todo[k].question,
                      seed=row_seed(row["id"]))
        if max(len(item.hinted_prompt), len(item.student_prompt)) >= engine.max_length:
            job.keep_original(k, "max_length", hd_tokens=0)
            continue
        items.append(item)
        hd_rows.append(k)
    job.report("hint", len(rows), len(rows))
    return items, hd_rows


class TokenProgress:
    """Reports hinted-decoding progress every 256 generated tokens (an upper bound as total)."""

    def __init__(self, report: Report, total: int):
        self.report, self.total, self.done = report, total, 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done % 256 < n:
            self.report("hinted-decoding tokens (upper bound)", self.done, self.total)


def _hinted_decoding(job: Rewrite, model, items: list[HDItem], hd_rows: list[int]) -> None:
    """Stage 3: hinted decoding in batches; an output the verifier accepts (or cannot judge)
    becomes the response (source hd), otherwise the row keeps its original response."""
    if not items:
        return
    tok, params = job.tok, job.params
    decode_token, tick = TokenText(tok), TokenProgress(job.report, len(items) * params.hd.max_new_tokens)
    for s in range(0, len(items), params.batch_size):
        results = hinted_decode(model, items[s:s + params.batch_size], params.hd, {job.eos},
                                decode_token=decode_token, pad_id=tok.pad_token_id or 0,
                                max_positions=job.engine.max_length, on_token=tick)
        for k, res in zip(hd_rows[s:s + params.batch_size], results, strict=True):
            text = _text(tok, res.tokens)
            job.out[k].update(hd_response=text, hd_tokens=len(res.tokens), finish_reason=res.finish_reason)
            verdict = job.accept(text, k) if text else False
            if verdict is False:
                job.out[k].update(source="original", verified=False)
            else:
                job.out[k].update(response=text, source="hd", verified=verdict)
    job.report("hinted-decoding", len(items), len(items))


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


def recipe_summary(rows: list[dict]) -> dict:
    """Corpus-level figures: sources, finish reasons, verified fraction, mean CLL new vs original."""
    ok = [r for r in rows if not r.get("error")]
    both = [r for r in ok if r.get("cll") is not None and r.get("cll_original") is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {
        "rows": len(rows), "error_rows": len(rows) - len(ok), "dropped": sum(bool(r.get("dropped")) for r in rows),
        "sources": dict(Counter(r["source"] for r in ok)),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in ok)),
        "verified_fraction": mean([1.0 if r["verified"] else 0.0 for r in ok]),
        "cll_mean": mean([r["cll"] for r in both]),
        "cll_original_mean": mean([r["cll_original"] for r in both]),
    }
