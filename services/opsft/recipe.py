"""The on-policy data recipe (the paper's pipeline): rewrite an off-policy corpus into the
model's own distribution while keeping its answers right. Rows in, rows out; Ray-free.

Policy `self-first` (default):
  1. the model answers every question itself (greedy); an answer the verifier accepts is kept
     as it is (`source` = self: it is already on-policy);
  2. the other rows go through Hinted Decoding: a greedy "# Analyze ... # CoT" hint, cut after
     its last "# CoT" (no marker: finish reason `no_hint`; or, with missing_hint="cot", the
     hinted stream opened at "# CoT" without an analysis, `hint_forced` = true), then
     opsft.hinted.hinted_decode;
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

from opsft.chat import end_of_turn_id, prompt_ids, response_ids
from opsft.corpus import RowError, parse_row, question_text, with_id
from opsft.engines.base import GenerationParams
from opsft.hinted import COT_MARKER, HDItem, HDParams, TokenText, analysis_prefix, hint_messages, hinted_decode
from opsft.scoring import score_rows
from opsft.verify import extract_final_answer, make_verifier

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
    verifier: str = "auto"        # opsft.verify.make_verifier name

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


def rewrite_rows(rows: list[dict], engine, params: RewriteParams | dict | None = None, verifier=None,
                 hd_model=None, report: Report | None = None) -> list[dict]:
    """Every row rewritten per the policy, in input order (rows out == rows in).

    engine: generates the self-answers and hints and scores CLL (opsft.engines);
    params: RewriteParams, or flat RewriteConfig fields; verifier: a callable (default: params.verifier);
    hd_model: the transformers model for hinted decoding (default: engine.model)."""
    if not isinstance(params, RewriteParams):
        params = RewriteParams.from_config(dict(params or {}))
    verifier = verifier or make_verifier(params.verifier)
    report = report or (lambda stage, done, total: None)
    tok = engine.tokenizer
    eos = end_of_turn_id(tok)
    model = hd_model if hd_model is not None else getattr(engine, "model", None)
    if model is None:
        raise ValueError("hinted decoding needs a transformers model: pass hd_model or use the hf engine")
    out = [with_id(dict(row)) for row in rows]
    todo: dict[int, tuple] = {}  # row index -> (example, reference answer, the question's prompt ids)
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
        todo[k] = (ex, reference, question)

    def accept(text: str, k: int) -> bool | None:
        reference = todo[k][1]
        return None if reference is None else bool(verifier(text, reference, out[k]))

    # 1. self-answers
    need_hd = list(todo)
    if params.policy == "self-first" and need_hd:
        report("self-answer", 0, len(need_hd))
        prompts = [todo[k][2] for k in need_hd]
        gen = GenerationParams(max_new_tokens=params.hd.max_new_tokens, temperature=0.0,
                               stop_token_ids=(eos,), seed=params.hd.seed)
        answers = engine.generate(prompts, gen)
        still = []
        for k, tokens in zip(need_hd, answers, strict=True):
            text = _text(tok, tokens)
            verdict = accept(text, k)
            out[k].update(self_response=text, self_verified=verdict)
            if verdict:
                out[k].update(response=text, source="self", verified=True, finish_reason=_finish(tokens, eos))
            else:
                still.append(k)
        need_hd = still
        report("self-answer", len(todo), len(todo))

    # 2. hints
    items, hd_rows = [], []
    if need_hd:
        report("hint", 0, len(need_hd))
        hint_prompts = {k: prompt_ids(tok, hint_messages(question_text(todo[k][0].messages), todo[k][0].response))
                        for k in need_hd}
        for k in [k for k, hp in hint_prompts.items() if len(hp) >= engine.max_length]:  # no room for a hint
            out[k].update(source="original", verified=False, finish_reason="max_length", hd_tokens=0)
            del hint_prompts[k]
        hints = engine.generate(list(hint_prompts.values()), GenerationParams(
            max_new_tokens=params.hint_max_new_tokens, temperature=0.0, stop_token_ids=(eos,))) if hint_prompts else []
        for (k, hp), hint in zip(hint_prompts.items(), hints, strict=True):
            out[k]["hint"] = tok.decode(hint, skip_special_tokens=True)
            prefix = analysis_prefix(out[k]["hint"])
            out[k]["hint_forced"] = prefix is None and params.missing_hint == "cot"
            if out[k]["hint_forced"]:
                prefix = COT_MARKER  # no analysis: the hinted stream sees question + reference, then "# CoT"
            if prefix is None:
                out[k].update(source="original", verified=False, finish_reason="no_hint")
                continue
            item = HDItem(hinted_prompt=hp + response_ids(tok, prefix),
                          student_prompt=todo[k][2], seed=row_seed(out[k]["id"]))
            if max(len(item.hinted_prompt), len(item.student_prompt)) >= engine.max_length:
                out[k].update(source="original", verified=False, finish_reason="max_length", hd_tokens=0)
                continue
            items.append(item)
            hd_rows.append(k)
        report("hint", len(need_hd), len(need_hd))

    # 3. hinted decoding, verified
    if items:
        decode_token, done = TokenText(tok), [0]
        total = len(items) * params.hd.max_new_tokens

        def tick(n):
            done[0] += n
            if done[0] % 256 < n:
                report("hinted-decoding tokens (upper bound)", done[0], total)

        for s in range(0, len(items), params.batch_size):
            results = hinted_decode(model, items[s:s + params.batch_size], params.hd, {eos},
                                    decode_token=decode_token, pad_id=tok.pad_token_id or 0,
                                    max_positions=engine.max_length, on_token=tick)
            for k, res in zip(hd_rows[s:s + params.batch_size], results, strict=True):
                text = _text(tok, res.tokens)
                out[k].update(hd_response=text, hd_tokens=len(res.tokens), finish_reason=res.finish_reason)
                verdict = accept(text, k) if text else False
                if verdict is False:
                    out[k].update(source="original", verified=False)
                else:
                    out[k].update(response=text, source="hd", verified=verdict)
        report("hinted-decoding", len(items), len(items))

    # 4. CLL of the new and the original response under the plain model
    _add_cll(out, list(todo), engine)
    if params.drop_unverified:
        for row in out:
            row["dropped"] = row["source"] == "original" and row["verified"] is False
    return out


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
