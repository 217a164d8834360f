"""Hinted Decoding (method.md section 3): the batched decoder, over two streams of ONE model.

The hinted stream p (system prompt + question + reference answer + the model's own analysis
prefix) and the student stream q (the question alone). Per step, for each item still decoding:

    first token:  sampled from p alone
    then:         H_norm = H(p) / log V;  lambda = f(H_norm)   (linear, sigmoid, piecewise)
                  mixed  = (1 - lambda) * log p + lambda * log q
                  token  ~ top-p(mixed at temperature 1), then temperature   (greedy at T = 0)
    after the generated text contains the splitter: token ~ the same sampler on log q alone

Stop reasons: `eos`, `stop` (the generated text contains one of `stop_strings`: the recipe's
hint headers, text the model starts inventing after its answer), `max_length` (max_new_tokens or
the model's position limit), `repeating` (every `repeat_every` tokens: some `repeat_window`-token
window seen at least `repeat_times` times). With `hold_eos`, no end-of-sequence id can be picked
while the generated text is still blank (an output never ends before it has any content).
The official code runs one item at a time with no cache; here both streams are batches that a
decoder with the decode capability (opsft.engines.base.DecodeEngine: `open_stream`) keeps and
steps with its cache: items leave the batch as they finish, and an item that switched to the
student stream leaves the hinted batch. The hf engine's streams (a KV-cached, left-padded batch)
are opsft.engines.hf_streams; ModelStreams opens them on a bare transformers model.

This module is the method: the per-step math, the text rules and the loop, pure torch over token
ids. The settings, items and results are opsft.method.hinted_params; the hint prompt and its
reading are opsft.data.hints; the caller tokenizes (opsft.recipe). The only text the decoder sees
is through `decode_token(id) -> str` (opsft.data.chat.TokenText), used to spot the splitter
exactly as the official code does (concatenated per-token decodes), the stop strings and a blank
output the same way.

    results = hinted_decode(engine, [HDItem(hinted_ids, student_ids)], HDParams(beta=3.0), eos_ids={2},
                            decode_token=TokenText(tokenizer))   # an hf engine, or ModelStreams(model)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from opsft.method.hinted_params import HDItem, HDParams, HDResult, check_items

# ------------------------------------------------------------------------------ per-step math


def lambda_weight(h_norm: torch.Tensor, params: HDParams) -> torch.Tensor:
    """The student's weight from the hinted stream's normalised entropy (official modes)."""
    if params.lambda_mode == "linear":
        return torch.clamp(params.beta * h_norm, 0.0, 1.0)
    if params.lambda_mode == "sigmoid":
        return torch.sigmoid(params.beta * (h_norm - params.sigmoid_center))
    lo, hi = params.piecewise_bounds
    return torch.clamp((h_norm - lo) / (hi - lo), 0.0, 1.0)


def mixed_logprobs(logits_p: torch.Tensor, logits_q: torch.Tensor, params: HDParams) -> torch.Tensor:
    """(1 - lambda) log p + lambda log q per row (unnormalised: the sampler normalises)."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    lam = lambda_weight(entropy / math.log(logits_p.shape[-1]), params).unsqueeze(-1)
    return (1.0 - lam) * log_p + lam * log_q


def top_p_then_temperature(scores: torch.Tensor, top_p: float, temperature: float) -> torch.Tensor:
    """Probabilities of the official NucleusProcessor: the nucleus is chosen on softmax(scores)
    (temperature 1; the most likely token always kept), then softmax(kept / temperature)."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_scores, dim=-1), dim=-1)
    drop = torch.zeros_like(cumulative, dtype=torch.bool)
    drop[..., 1:] = cumulative[..., :-1] > top_p
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    probs_sorted = F.softmax(sorted_scores / temperature, dim=-1)
    return torch.zeros_like(probs_sorted).scatter(-1, order, probs_sorted)


def pick_tokens(scores: torch.Tensor, params: HDParams, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of scores [B, V]: argmax at temperature 0, else a draw from the top-p +
    temperature probabilities. Row r draws one uniform from its own generator (so an item's draw
    never depends on its batch) and the draw is made on the scores' device by inverse CDF, so CPU
    generators serve CUDA scores: one float per row crosses, not a vocabulary-sized tensor."""
    if params.temperature == 0:
        return scores.argmax(-1).tolist()
    probs = top_p_then_temperature(scores.float(), params.top_p, params.temperature)
    uniforms = [float(torch.rand((), generator=g, dtype=torch.float64, device=g.device if g is not None else "cpu"))
                for g in generators]
    return sample_inverse_cdf(probs, torch.tensor(uniforms, dtype=torch.float64)).tolist()


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of probs [B, V] (non-negative, any positive total): the first index whose cumulative
    probability exceeds uniforms[r] x the row total, in float64. A uniform u in [0, 1) picks token v
    for u in an interval of length p(v) / total, so the draw has exactly the distribution probs (up
    to float64 rounding); a zero-probability token owns an empty interval and is never picked."""
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1]
    picked = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    # u x total can round up to the total itself: keep the draw on the last token that has probability
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(picked, last_positive)


def is_repeating(tokens: Sequence[int], window: int, times: int) -> bool:
    """True when some `window`-token window occurs at least `times` times in tokens."""
    counts = Counter(tuple(tokens[i:i + window]) for i in range(len(tokens) - window + 1))
    return bool(counts) and max(counts.values()) >= times


def stop_after(tokens: Sequence[int], n: int, room: int, eos: set[int] | frozenset[int],
               params: HDParams, stop_found: bool = False) -> str | None:
    """Why decoding stops right after tokens[n - 1], the n-th generated token (the official rules,
    in their order, with `stop` after eos), or None to go on: `eos`, `stop` (stop_found: the text
    now contains one of params.stop_strings), `max_length` (n reaches the item's room), `repeating`
    (checked every params.repeat_every tokens)."""
    if tokens[n - 1] in eos:
        return "eos"
    if stop_found:
        return "stop"
    if n >= room:
        return "max_length"
    if n % params.repeat_every == 0 and is_repeating(tokens[:n], params.repeat_window, params.repeat_times):
        return "repeating"
    return None


class TextWatch:
    """Finds any of `strings` in the generated text as the official code finds its splitter: the
    per-token decodes concatenated, keeping only the last (longest string - 1) characters between
    tokens, so a string split across tokens is found at the token that completes it."""

    def __init__(self, strings: Sequence[str], decode_token: Callable[[int], str] | None, what: str = "a stop string"):
        self.strings = tuple(s for s in strings if s)
        if self.strings and decode_token is None:
            raise ValueError(f"{what} needs decode_token (id -> text) to find it in the generated text")
        self.decode_token, self.tail, self.found = decode_token, "", False
        self.keep = max((len(s) for s in self.strings), default=1) - 1

    def feed(self, token: int) -> bool:
        """True when the text so far, ending with `token`, contains one of the strings."""
        if self.found or not self.strings:
            return self.found
        text = self.tail + self.decode_token(token)
        self.tail = text[-self.keep:] if self.keep else ""
        self.found = any(s in text for s in self.strings)
        return self.found


class SplitterWatch(TextWatch):
    """The splitter's watch (one string; none when the splitter is None or empty)."""

    def __init__(self, splitter: str | None, decode_token: Callable[[int], str] | None):
        super().__init__([splitter or ""], decode_token, what="a splitter")


class ContentWatch:
    """Whether the generated text has any content yet (a non-blank character), for hold_eos
    (without decode_token, when hold_eos is off, it is never consulted)."""

    def __init__(self, decode_token: Callable[[int], str] | None):
        self.decode_token, self.seen = decode_token, False

    def feed(self, token: int) -> None:
        if not self.seen and self.decode_token is not None:
            self.seen = bool(self.decode_token(token).strip())


def check_text_rules(params: HDParams, decode_token: Callable[[int], str] | None) -> None:
    """Refuse (ValueError) a splitter, stop strings or hold_eos without decode_token: each reads the
    generated text. Both decoders call it before any work."""
    SplitterWatch(params.splitter, decode_token)
    TextWatch(params.stop_strings, decode_token)
    if params.hold_eos and decode_token is None:
        raise ValueError("hold_eos needs decode_token (id -> text) to tell a blank output from one with content")


def mask_eos(scores: torch.Tensor, rows: Sequence[int], eos: Sequence[int]) -> torch.Tensor:
    """scores [B, V] with every eos id at -inf in the given rows (outputs that are still blank):
    the sampler renormalises over the other tokens. Returns scores (changed in place)."""
    if rows and eos:
        index = torch.tensor(list(rows), device=scores.device)
        scores[index[:, None], torch.tensor(sorted(eos), device=scores.device)[None, :]] = float("-inf")
    return scores


def trim_at_stop(tokens: Sequence[int], stop_strings: Sequence[str], decode_token: Callable[[int], str]) -> list[int]:
    """tokens up to the one that completes the first stop string in their text (all of them when
    none occurs): what an engine returns for a generation with stop strings, whatever it generated
    past the stop (a batch row padded after it stopped, say)."""
    watch = TextWatch(stop_strings, decode_token)
    for n, token in enumerate(tokens, start=1):
        if watch.feed(token):
            return list(tokens[:n])
    return list(tokens)


def item_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@torch.inference_mode()
def hinted_decode(decoder, items: list[HDItem], params: HDParams, eos_ids: set[int] | Sequence[int],
                  decode_token: Callable[[int], str] | None = None, max_positions: int | None = None,
                  on_token: Callable[[int], None] | None = None) -> list[HDResult]:
    """Hinted decoding of all items in one shrinking batch; results in input order.

    decoder: anything with the decode capability (opsft.engines.base.DecodeEngine): `open_stream(prompts,
    items)` -> a stream with `items`, `last_logits`, `step(tokens)`, `keep(items)`, and `max_length`
    (an hf engine; opsft.engines.hf_streams.ModelStreams over a bare transformers model);
    decode_token maps one id to its text (needed only when params.splitter is set);
    max_positions bounds prompt + generated tokens (default: the decoder's max_length);
    on_token(n) is called with the number of tokens produced at each step (progress)."""
    check_text_rules(params, decode_token)
    limit = max_positions or getattr(decoder, "max_length", None) or 10**9
    check_items(items, limit)
    if not items:
        return []
    eos = set(eos_ids)
    results = [HDResult(tokens=[], finish_reason="") for _ in items]
    watches = [SplitterWatch(params.splitter, decode_token) for _ in items]
    stops = [TextWatch(params.stop_strings, decode_token) for _ in items]
    content = [ContentWatch(decode_token) for _ in items]
    generators = [item_generator(params.seed, k if it.seed is None else it.seed) if params.temperature > 0 else None
                  for k, it in enumerate(items)]
    room = [min(params.max_new_tokens, limit - max(len(it.hinted_prompt), len(it.student_prompt))) for it in items]

    everyone = list(range(len(items)))
    hinted = decoder.open_stream([it.hinted_prompt for it in items], everyone)
    student = decoder.open_stream([it.student_prompt for it in items], everyone)
    # First token from the hinted stream alone.
    scores = F.log_softmax(hinted.last_logits, dim=-1)
    rows = everyone
    while True:
        if params.hold_eos:
            mask_eos(scores, [r for r, i in enumerate(rows) if not content[i].seen], eos)
        picked = pick_tokens(scores, params, [generators[i] for i in rows])
        active = set()
        for i, token in zip(rows, picked, strict=True):
            res = results[i]
            res.tokens.append(token)
            n = len(res.tokens)
            found = res.switched_at is None and watches[i].feed(token)
            content[i].feed(token)
            reason = stop_after(res.tokens, n, room[i], eos, params, stops[i].feed(token))
            if reason:
                res.finish_reason = reason
            else:
                active.add(i)
                if found:
                    res.switched_at = n  # the next token comes from the student stream alone
        if on_token:
            on_token(len(rows))
        if not active:
            return results
        mixing = {i for i in active if results[i].switched_at is None}
        hinted.keep(mixing)
        student.keep(active)
        if hinted.items:
            logits_p = hinted.step([results[i].tokens[-1] for i in hinted.items])
        logits_q = student.step([results[i].tokens[-1] for i in student.items])
        scores = F.log_softmax(logits_q, dim=-1)  # student-only rows
        if hinted.items:
            where = {i: r for r, i in enumerate(student.items)}
            mix_rows = torch.tensor([where[i] for i in hinted.items], device=scores.device)
            scores[mix_rows] = mixed_logprobs(logits_p, logits_q[mix_rows], params)
        rows = student.items
