"""Hinted Decoding (method.md section 3): the batched, key/value-cached decoder.

Two streams of ONE model: the hinted stream p (system prompt + question + reference
answer + the model's own analysis prefix) and the student stream q (the question alone).
Per step, for each item still decoding:

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
The official code runs one item at a time with no cache; here every
stream keeps a DynamicCache over a left-padded batch (attention mask + explicit position ids),
items leave the batch as they finish (their cache rows are index-selected away), and an item
that switched to the student stream leaves the hinted batch.

Pure torch over token ids: the caller tokenizes (see `build_hint_prompt`, `hinted_prompt_ids`
and opsft.recipe). The only text the decoder sees is through `decode_token(id) -> str`, used
to spot the splitter exactly as the official code does (concatenated per-token decodes), the
stop strings and a blank output the same way.

    results = hinted_decode(engine, [HDItem(hinted_ids, student_ids)], HDParams(beta=3.0), eos_ids={2},
                            decode_token=TokenText(tokenizer))   # an hf engine, or a transformers model
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

LAMBDA_MODES = ("linear", "sigmoid", "piecewise")

# The hint prompt: our own wording of what the method asks (method.md section 3): analyse the
# reference line by line under "# Analyze", then write one's own chain of thought under "# CoT"
# without mentioning the reference. Short, so a small model's hinted stream stays cheap.
HINT_SYSTEM_PROMPT = (Path(__file__).parents[1] / "data" / "hd_system_prompt.txt").read_text(encoding="utf-8")
# hint_prompt "direct": no analysis asked for; the hinted stream opens at the marker line at once
DIRECT_SYSTEM_PROMPT = (Path(__file__).parents[1] / "data" / "hd_direct_prompt.txt").read_text(encoding="utf-8")
HINT_PROMPTS = ("analyze", "direct")
HINT_USER_TEMPLATE = "\n# Question:\n{question}\n\n# Answer:\n{answer}\n\n# CoT:\n"
COT_MARKER = "# CoT"


@dataclass(frozen=True)
class HDParams:
    beta: float = 3.0
    lambda_mode: str = "linear"
    sigmoid_center: float = 0.5
    piecewise_bounds: tuple[float, float] = (0.3, 0.7)
    temperature: float = 0.3  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 1024
    seed: int = 0
    splitter: str | None = "\\boxed{"
    repeat_window: int = 30
    repeat_times: int = 5
    repeat_every: int = 100
    stop_strings: tuple[str, ...] = ()  # the official code has none; the recipe stops at its hint headers
    hold_eos: bool = False              # True: no eos while the output is blank (official: eos any time)

    @classmethod
    def from_fields(cls, fields: dict) -> HDParams:
        """From a JSON-style dict of fields (dataclasses.asdict, or a request): lists become tuples."""
        values = dict(fields)
        for name in ("piecewise_bounds", "stop_strings"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def __post_init__(self):
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {self.lambda_mode!r}")
        if self.beta < 0 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("need beta >= 0, temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")
        lo, hi = self.piecewise_bounds
        if not lo < hi:
            raise ValueError(f"piecewise_bounds must be (h1, h2) with h1 < h2, got {self.piecewise_bounds}")
        if any(not isinstance(text, str) or not text for text in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")


@dataclass(frozen=True)
class HDItem:
    hinted_prompt: list[int]   # chat(system + question + reference) + generation prompt + analysis prefix
    student_prompt: list[int]  # chat(question) + generation prompt
    seed: int | None = None    # sampling seed of this item (None: its index in the call); the recipe derives it
                               # from the row id, so a row samples the same tokens in any batch (resume-safe)


@dataclass
class HDResult:
    tokens: list[int]
    finish_reason: str
    switched_at: int | None = None  # index of the first token decoded from the student stream alone


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


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """text up to the first occurrence of any stop string (the whole text when none occurs)."""
    at = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:at]


def item_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class TokenText:
    """decode_token for the splitter check: the text of one token id, memoised (edge helper)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


# ------------------------------------------------------------------------------ batched streams


class Stream:
    """One left-padded batch of sequences with its DynamicCache; rows carry item indices."""

    def __init__(self, model, prompts: list[list[int]], items: list[int], pad_id: int, prefill_rows: int):
        self.model, self.items = model, list(items)
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            self.attn[r, width - len(p):] = 1
        self.attn = self.attn.to(device)
        self.next_pos = self.attn.sum(-1)
        positions = (self.attn.cumsum(-1) - 1).clamp(min=0)
        # Prefill in row chunks (bounded activation memory), then join the caches along the batch.
        chunks, logits = [], []
        for s in range(0, len(prompts), prefill_rows):
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids[s:s + prefill_rows].to(device), attention_mask=self.attn[s:s + prefill_rows],
                        position_ids=positions[s:s + prefill_rows], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            chunks.append(out.past_key_values)
            logits.append(out.logits[:, -1].float())
        self.cache = chunks[0] if len(chunks) == 1 else _concat_caches(chunks, model.config)
        self.last_logits = torch.cat(logits)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Append one token per row; the next-token logits [rows, V]."""
        device = self.attn.device
        self.attn = torch.cat([self.attn, torch.ones((len(tokens), 1), dtype=torch.long, device=device)], dim=1)
        out = self.model(input_ids=torch.tensor(tokens, dtype=torch.long, device=device)[:, None],
                         attention_mask=self.attn, position_ids=self.next_pos[:, None], past_key_values=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        self.last_logits = out.logits[:, -1].float()
        return self.last_logits

    def keep(self, items: set[int]) -> None:
        """Drop every row whose item is not in `items`, and left padding no row needs any more."""
        rows = [r for r, i in enumerate(self.items) if i in items]
        if len(rows) == len(self.items):
            return
        self.items = [self.items[r] for r in rows]
        if not rows:
            return
        index = torch.tensor(rows, device=self.attn.device)
        self.cache.batch_select_indices(index)
        self.attn, self.next_pos, self.last_logits = self.attn[index], self.next_pos[index], self.last_logits[index]
        first_used = int((self.attn.sum(0) > 0).nonzero()[0])
        if first_used > 0:
            self.attn = self.attn[:, first_used:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first_used:, :], layer.values[..., first_used:, :]


class ModelStreams:
    """The decode capability (opsft.engines.base.DecodeEngine) over a transformers model:
    `open_stream(prompts, items)` prefills a Stream, as HFEngine.open_stream does for its own model;
    a bare model handed to hinted_decode is wrapped in it."""

    def __init__(self, model, pad_id: int = 0, prefill_rows: int = 4):
        self.model, self.pad_id, self.prefill_rows = model, pad_id, prefill_rows
        self.max_length = getattr(model.config, "max_position_embeddings", None) or 10**9

    def open_stream(self, prompts: list[list[int]], items: list[int]) -> Stream:
        return Stream(self.model, prompts, items, self.pad_id, self.prefill_rows)


def _concat_caches(caches: list[DynamicCache], config) -> DynamicCache:
    merged = DynamicCache(config=config)
    for layer_idx in range(len(caches[0].layers)):
        keys = torch.cat([c.layers[layer_idx].keys for c in caches])
        values = torch.cat([c.layers[layer_idx].values for c in caches])
        merged.update(keys, values, layer_idx)
    return merged


@torch.inference_mode()
def hinted_decode(decoder, items: list[HDItem], params: HDParams, eos_ids: set[int] | Sequence[int],
                  decode_token: Callable[[int], str] | None = None, pad_id: int = 0, prefill_rows: int = 4,
                  max_positions: int | None = None, on_token: Callable[[int], None] | None = None) -> list[HDResult]:
    """Hinted decoding of all items in one shrinking batch; results in input order.

    decoder: an engine with the decode capability (`open_stream(prompts, items)` -> a stream with
    `items`, `last_logits`, `step(tokens)`, `keep(items)`; opsft.engines.base.DecodeEngine), or a
    transformers model (wrapped in ModelStreams with pad_id and prefill_rows);
    decode_token maps one id to its text (needed only when params.splitter is set);
    max_positions bounds prompt + generated tokens (default: the decoder's max_length);
    on_token(n) is called with the number of tokens produced at each step (progress)."""
    check_text_rules(params, decode_token)
    if not hasattr(decoder, "open_stream"):
        decoder = ModelStreams(decoder, pad_id, prefill_rows)
    limit = max_positions or getattr(decoder, "max_length", None) or 10**9
    for k, item in enumerate(items):
        longest = max(len(item.hinted_prompt), len(item.student_prompt))
        if not item.hinted_prompt or not item.student_prompt:
            raise ValueError(f"item {k}: empty prompt")
        if longest >= limit:
            raise ValueError(f"item {k}: prompt of {longest} tokens leaves no room (model limit {limit})")
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


# ------------------------------------------------------------------------------ prompts (edge helpers)


def hint_messages(question: str, reference: str, prompt: str = "analyze") -> list[dict]:
    """The chat that asks the model for "# Analyze ... # CoT" given the question and the reference
    (prompt "analyze"), or for its own solution under "# CoT" at once (prompt "direct")."""
    if prompt not in HINT_PROMPTS:
        raise ValueError(f"hint prompt must be one of {HINT_PROMPTS}, got {prompt!r}")
    system = HINT_SYSTEM_PROMPT if prompt == "analyze" else DIRECT_SYSTEM_PROMPT
    return [{"role": "system", "content": system},
            {"role": "user", "content": HINT_USER_TEMPLATE.format(question=question, answer=reference)}]


HINT_CUTS = ("line", "marker")
MISSING_HINT = ("cot", "skip")
# The hint template's own headers: a hint that writes one has started an example of its own (a new
# question), so its text from there on is not about the row being rewritten.
HINT_HEADERS = ("# Question", "# Answer")
HINT_STOPS = (COT_MARKER, *HINT_HEADERS)  # where hint generation stops: its marker, or a new example
# Where the hinted-decoding output stops (HDParams.stop_strings in the recipe): a line that opens a
# section of the hint template again is text the hinted stream invents past its own answer.
OUTPUT_STOPS = (*HINT_HEADERS, "# Analy", COT_MARKER)
_ANALYSIS_HEADING = re.compile(r"^[ \t]*#+[ \t]*analy[a-z]*[ \t]*:?[ \t]*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class HintReading:
    """What a hint output holds for the row it was asked about: the analysis (the text before the
    first "# CoT" marker or the first header of a new example, whichever comes first), whether the
    marker ended it, and whether it is usable: it says something (more than an "# Analyze"
    heading) and the hint ended (a hint that ran out of tokens with neither marker nor header is
    runaway text, often one line repeated)."""

    analysis: str
    marker: bool
    ended: bool = True

    @property
    def usable(self) -> bool:
        return self.ended and bool(_ANALYSIS_HEADING.sub("", self.analysis).strip())


def read_hint(hint_output: str, ended: bool = True) -> HintReading:
    """The hint read up to the marker that belongs to the row's question: the FIRST "# CoT"; any
    marker after a "# Question"/"# Answer" header belongs to an example the model invented.
    `ended`: whether the generation ended by itself (an end-of-turn token or a stop string), not at
    its token budget; a hint stopped at its marker or at a header has ended whatever it says."""
    found = {text: hint_output.find(text) for text in HINT_STOPS}
    ends = [at for at in found.values() if at >= 0]
    end = min(ends, default=len(hint_output))
    return HintReading(analysis=hint_output[:end], marker=bool(ends) and found[COT_MARKER] == end,
                       ended=ended or bool(ends))


def marker_line(cut: str = "line") -> str:
    """The marker as the hinted stream sees it: "# CoT:" and a newline (cut "line": the template's own
    line, so both streams start on the chain of thought) or "# CoT" alone (cut "marker", official)."""
    if cut not in HINT_CUTS:
        raise ValueError(f"hint cut must be one of {HINT_CUTS}, got {cut!r}")
    return COT_MARKER + (":\n" if cut == "line" else "")


def hint_prefix(hint_output: str, cut: str = "line", missing_hint: str = "cot",
                ended: bool = True) -> tuple[str | None, bool]:
    """(the analysis prefix of the hinted stream, whether we wrote its marker) for a hint output.

    A hint with a usable analysis ended by its marker: the analysis, then the marker line (cut
    "marker", the official rule: the hint exactly up to the end of "# CoT"). Otherwise (no marker:
    the hint ended or began a new example; or no analysis before the marker; or a hint that ran
    out of tokens, `ended` False, with neither) as missing_hint says:
    "skip" (official) gives None (the row keeps its reference, finish reason no_hint); "cot" opens
    the hinted stream at the marker line anyway, after the analysis when there is one."""
    if missing_hint not in MISSING_HINT:
        raise ValueError(f"missing_hint must be one of {MISSING_HINT}, got {missing_hint!r}")
    reading = read_hint(hint_output, ended)
    if reading.marker and reading.usable:
        return reading.analysis + marker_line(cut), False
    if missing_hint == "skip":
        return None, False
    if not reading.usable:
        return marker_line(cut), True
    return reading.analysis.rstrip() + "\n\n" + marker_line(cut), True
