"""Hinted decoding on vLLM: the decode capability of the vllm engine (VLLMEngine.hinted_decode).

The two streams of every item (method.md section 3) run as two requests of one vLLM generate
runner, paired by a batch-level logits processor, HintedPairs. The hf decoder
(opsft.method.hinted.hinted_decode) is the reference; both use the same per-step functions
(mixed_logprobs, mask_eos, pick_tokens, stop_after, the text watches), the same item check
(opsft.method.hinted_params.check_items) and the same per-item generators.

1. Pass 1: every hinted prompt alone, one token: the first token comes from the hinted stream
   alone, as in the reference.
2. Pass 2, in waves: per item, the hinted request (hinted prompt + that token) and the student
   request (student prompt + that token). In each engine step the processor sees the logits of
   both rows of a pair, mixes them, picks the token with the item's generator and forces it on
   both rows (every other logit -inf, so vLLM's own greedy sampler takes it). After the splitter
   the hinted request is ended (a forced end-of-sequence token) and the student goes on from its
   own distribution alone. While an item's output is blank and params.hold_eos is set, its eos ids
   are masked before the pick. eos and max_length end both requests in vLLM itself (stop_token_ids,
   max_tokens); `repeating` and `stop` (a stop string in the text) are ended by a forced
   end-of-sequence token that the driver drops.
3. The driver takes each item's tokens from its student request and replays the stop rules on
   them (finish reason, where the student took over).

Keeping a pair in step. The runner has chunked prefill off, so a prompt is prefilled in one step
and every row that reaches the sampler keeps its token; a wave fits the scheduler's token and
sequence budgets, so all its requests are scheduled in its first step and decode together. A
pair can still fall out of step when the scheduler leaves one of its requests out of a step
(preemption when the KV cache runs out). The processor then ends both requests and appends the
pair's key to the wave's channel file (a local file: the engine core runs on this node); the
driver decodes those items again, one pair per wave, and an item out of step twice gets finish
reason `out_of_step` (the recipe keeps the row's original response). `stats` counts both.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from opsft.data.chat import TokenText
from opsft.engines.batching import token_groups
from opsft.method.hinted import (
    ContentWatch,
    SplitterWatch,
    TextWatch,
    check_text_rules,
    item_generator,
    mask_eos,
    mixed_logprobs,
    pick_tokens,
    stop_after,
)
from opsft.method.hinted_params import HDItem, HDParams, HDResult, check_items

log = logging.getLogger(__name__)
ARG = "opsft_hd"  # the SamplingParams.extra_args key of a hinted-decoding request
PROCESSOR = "opsft.engines.vllm_hd:HintedPairs"  # how the vllm engine names the processor to vLLM

try:  # the processor runs inside vLLM; without it (the main venv) the module still imports
    from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality
except ImportError:  # the main venv: the processor runs in tests against a simulated scheduler
    import enum

    LogitsProcessor = object

    class MoveDirectionality(enum.Enum):
        UNIDIRECTIONAL = enum.auto()
        SWAP = enum.auto()


class _Pair:
    """The shared state of one item's two requests (or of a pass-1 request, role "first")."""

    def __init__(self, spec: dict, decode_token):
        self.key, self.channel = spec["key"], spec.get("channel")
        self.params = HDParams.from_fields(spec["params"])
        self.eos = frozenset(spec.get("eos", ()))
        self.room = spec.get("room", 1)
        self.tokens = list(spec.get("tokens", ()))
        self.switched = bool(spec.get("switched", False))
        self.open = set(spec.get("roles", ("first",)))  # roles whose request has not had its last token
        self.count = dict.fromkeys(self.open, len(self.tokens))
        self.broken = self.ending = False
        self.generator = None
        if self.params.temperature > 0:
            self.generator = item_generator(self.params.seed, spec["seed"])
            for _ in self.tokens:  # the draws the given tokens took (one per token, as in pick_tokens)
                torch.rand((), generator=self.generator, dtype=torch.float64)
        self.watch = SplitterWatch(self.params.splitter, decode_token)
        self.stops = TextWatch(self.params.stop_strings, decode_token)
        self.content = ContentWatch(decode_token)
        for token in self.tokens:
            if not self.switched:
                self.watch.feed(token)
            self.stops.feed(token)
            self.content.feed(token)

    def took(self, token: int, roles: Sequence[str]) -> None:
        """`token` was picked for these roles (the pair's next token): the reference's stop rules."""
        self.tokens.append(token)
        for role in roles:
            self.count[role] += 1
        n = len(self.tokens)
        found = not self.switched and self.watch.feed(token)
        self.content.feed(token)
        reason = stop_after(self.tokens, n, self.room, self.eos, self.params, self.stops.feed(token))
        if reason in ("eos", "max_length"):
            self.open.difference_update(roles)  # vLLM ends the requests itself
        elif reason in ("repeating", "stop"):
            self.ending = True  # vLLM does not know these rules: forced end next step
        elif found:
            self.switched = True


class HintedPairs(LogitsProcessor):
    """vLLM V1 batch-level logits processor of hinted decoding (see the module docstring). Requests
    without extra_args[ARG] are left alone; an engine step with none of ours costs one dict check."""

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.device = device
        self.tokenizer_path = vllm_config.model_config.tokenizer
        self._decode_token = None
        self.rows: dict[int, tuple[_Pair, str]] = {}   # persistent-batch index -> (pair, role)
        self.pairs: dict[str, _Pair] = {}              # key -> pair, until every request of it ended

    def is_argmax_invariant(self) -> bool:
        return False  # it picks the token: it must run before greedy sampling

    def decode_token(self, token: int) -> str:
        if self._decode_token is None:
            from transformers import AutoTokenizer

            self._decode_token = TokenText(AutoTokenizer.from_pretrained(self.tokenizer_path))
        return self._decode_token(token)

    def _pair(self, spec: dict) -> _Pair:
        pair = self.pairs.get(spec["key"])
        if pair is None:  # a request re-added after being left out of steps keeps its pair's state
            needs_text = spec["params"]["splitter"] or spec["params"]["stop_strings"] or spec["params"]["hold_eos"]
            pair = self.pairs[spec["key"]] = _Pair(spec, self.decode_token if needs_text else None)
        return pair

    def update_state(self, batch_update) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, _ in batch_update.added:
            spec = (getattr(params, "extra_args", None) or {}).get(ARG)
            if spec is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (self._pair(spec), spec["role"])
        for a, b, direction in batch_update.moved:
            entry_a, entry_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if entry_a is not None:
                self.rows[b] = entry_a
            if entry_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = entry_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        present: dict[str, tuple[_Pair, dict[str, int]]] = {}
        for row, (pair, role) in self.rows.items():
            if row < logits.shape[0]:
                present.setdefault(pair.key, (pair, {}))[1][role] = row
        # per pair, what this step does: pick from p alone ("first"), from q alone (after the
        # splitter), from the mixture ("h" and "s" in step); or end its requests
        picks: dict[HDParams, list[tuple[_Pair, str, list[str], list[int]]]] = {}
        ends: list[tuple[_Pair, str, int]] = []
        for pair, roles in present.values():
            if not pair.open:  # a request scheduled once more after its last token: its sample is discarded
                ends += [(pair, role, row) for role, row in roles.items()]
            elif "first" in roles:
                picks.setdefault(pair.params, []).append((pair, "p", ["first"], [roles["first"]]))
            elif pair.broken or pair.ending:
                ends += [(pair, role, row) for role, row in roles.items()]
            elif pair.switched:
                if "h" in roles:
                    ends.append((pair, "h", roles["h"]))
                if "s" in roles:
                    picks.setdefault(pair.params, []).append((pair, "q", ["s"], [roles["s"]]))
            elif "h" in roles and "s" in roles and pair.count["h"] == pair.count["s"] == len(pair.tokens):
                picks.setdefault(pair.params, []).append((pair, "mix", ["h", "s"], [roles["h"], roles["s"]]))
            else:  # one request of the pair decodes without the other: out of step
                log.warning("hinted decoding: pair %s out of step (requests present: %s; tokens %s, picked %d)",
                            pair.key, sorted(roles), pair.count, len(pair.tokens))
                pair.broken = True
                if pair.channel:
                    with open(pair.channel, "a") as handle:
                        handle.write(pair.key + "\n")
                ends += [(pair, role, row) for role, row in roles.items()]
        forced_rows, forced_tokens = [], []
        for params, group in picks.items():
            scores = torch.empty((len(group), logits.shape[-1]), dtype=torch.float32, device=logits.device)
            for kind in ("p", "q", "mix"):
                at = [i for i, pick in enumerate(group) if pick[1] == kind]
                if not at:
                    continue
                first_rows = torch.tensor([group[i][3][0] for i in at], device=logits.device)
                if kind == "mix":
                    student_rows = torch.tensor([group[i][3][1] for i in at], device=logits.device)
                    scores[at] = mixed_logprobs(logits[first_rows], logits[student_rows], params)
                else:
                    scores[at] = F.log_softmax(logits[first_rows].float(), dim=-1)
            if params.hold_eos:
                blank = [i for i, pick in enumerate(group) if not pick[0].content.seen]
                mask_eos(scores, blank, group[0][0].eos)
            tokens = pick_tokens(scores, params, [pair.generator for pair, *_ in group])
            for (pair, _, roles, rows), token in zip(group, tokens, strict=True):
                if roles == ["first"]:
                    pair.open.clear()
                else:
                    pair.took(token, roles)
                forced_rows += rows
                forced_tokens += [token] * len(rows)
        for pair, role, row in ends:
            forced_rows.append(row)
            forced_tokens.append(min(pair.eos))
            pair.open.discard(role)
        for group in picks.values():
            for pair, *_ in group:
                if not pair.open:
                    self.pairs.pop(pair.key, None)
        for pair, *_ in ends:
            if not pair.open:
                self.pairs.pop(pair.key, None)
        if forced_rows:
            rows = torch.tensor(forced_rows, device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, torch.tensor(forced_tokens, device=logits.device)] = 0.0
        return logits


# ------------------------------------------------------------------------------ the driver


def replay(tokens: list[int], room: int, eos: set[int], params: HDParams,
           decode_token: Callable[[int], str] | None) -> HDResult | None:
    """The reference's stop rules over an item's generated tokens: the result, or None when the
    tokens end before any rule stops them (the requests were ended early: out of step). One
    extra token past a `repeating` or `stop` stop is the processor's forced end, dropped here."""
    watch, switched_at = SplitterWatch(params.splitter, decode_token), None
    stops = TextWatch(params.stop_strings, decode_token)
    for n in range(1, len(tokens) + 1):
        found = switched_at is None and watch.feed(tokens[n - 1])
        reason = stop_after(tokens, n, room, eos, params, stops.feed(tokens[n - 1]))
        if reason:
            extra = tokens[n:]
            if extra and not (reason in ("repeating", "stop") and len(extra) == 1 and extra[0] in eos):
                return None
            return HDResult(tokens=tokens[:n], finish_reason=reason, switched_at=switched_at)
        if found:
            switched_at = n
    return None


def hinted_decode_vllm(llm, items: list[HDItem], params: HDParams, eos_ids, decode_token=None,
                       max_positions: int | None = None, on_token: Callable[[int], None] | None = None,
                       stats: dict | None = None) -> list[HDResult]:
    """Hinted decoding of `items` on a vLLM LLM whose engine runs HintedPairs with chunked prefill
    off (VLLMEngine's generate runner); the results equal hinted_decode's on the same model, in
    input order. stats (optional) gets `out_of_step_retried` and `out_of_step` counts added."""
    from vllm import SamplingParams

    check_text_rules(params, decode_token)
    limit = max_positions or llm.llm_engine.vllm_config.model_config.max_model_len
    check_items(items, limit)
    if not items:
        return []
    eos = sorted(set(eos_ids))
    if not eos:
        raise ValueError("hinted decoding on vLLM needs at least one end-of-sequence id: it ends requests with one")
    call = uuid.uuid4().hex[:12]
    spec_params = dataclasses.asdict(params)
    seeds = [k if it.seed is None else it.seed for k, it in enumerate(items)]
    rooms = [min(params.max_new_tokens, limit - max(len(it.hinted_prompt), len(it.student_prompt))) for it in items]
    results: list[HDResult | None] = [None] * len(items)

    def sampling(max_tokens: int, spec: dict) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stop_token_ids=eos,
                              detokenize=False, extra_args={ARG: spec})

    # pass 1: the first token of every item, from its hinted stream alone
    first = llm.generate([{"prompt_token_ids": list(it.hinted_prompt)} for it in items],
                         [sampling(1, {"key": f"{call}:{k}:first", "role": "first", "seed": seeds[k],
                                       "params": spec_params, "eos": eos}) for k in range(len(items))],
                         use_tqdm=False)
    if on_token:
        on_token(len(items))
    t0 = [out.outputs[0].token_ids[0] for out in first]
    switched = [SplitterWatch(params.splitter, decode_token).feed(token) for token in t0]  # the student alone next
    todo = []
    for k, token in enumerate(t0):
        done = replay([token], rooms[k], set(eos), params, decode_token)
        if done is not None:
            results[k] = done
        else:
            todo.append(k)

    config = llm.llm_engine.vllm_config
    scheduler, cache = config.scheduler_config, config.cache_config
    # a wave's prompts take at most half the KV cache (the engine core runs in this process, so
    # its block count is known here), leaving room for the outputs to grow
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    budget = min(scheduler.max_num_batched_tokens, kv_tokens // 2) if kv_tokens else scheduler.max_num_batched_tokens
    with tempfile.TemporaryDirectory(prefix="opsft-hd-") as folder:
        for attempt in (1, 2):  # attempt 2: the items that fell out of step, one pair per wave
            retry = []
            lengths = [len(items[k].hinted_prompt) + len(items[k].student_prompt) + 2 for k in todo]
            # a wave's prompts (both requests of an item) fit one step's token budget and max_num_seqs
            groups = token_groups(lengths, budget, max(1, scheduler.max_num_seqs // 2)) if attempt == 1 else \
                [[i] for i in range(len(todo))]
            for group in groups:
                wave = [todo[i] for i in group]
                channel = str(Path(folder) / f"wave-{attempt}-{group[0]}")
                prompts, sparams, student_at = [], [], {}
                for k in wave:
                    roles = ["s"] if switched[k] else ["h", "s"]
                    spec = {"key": f"{call}:{k}:{attempt}", "params": spec_params, "eos": eos, "room": rooms[k],
                            "tokens": [t0[k]], "switched": switched[k], "seed": seeds[k], "channel": channel,
                            "roles": roles}
                    for role in roles:
                        prompt = items[k].hinted_prompt if role == "h" else items[k].student_prompt
                        if role == "s":
                            student_at[k] = len(prompts)
                        prompts.append({"prompt_token_ids": [*prompt, t0[k]]})
                        sparams.append(sampling(rooms[k] - 1, {**spec, "role": role}))
                outputs = llm.generate(prompts, sparams, use_tqdm=False)
                broken = set(Path(channel).read_text().split()) if os.path.exists(channel) else set()
                produced = 0
                for k in wave:
                    tokens = [t0[k], *outputs[student_at[k]].outputs[0].token_ids]
                    produced += len(tokens) - 1
                    result = None if f"{call}:{k}:{attempt}" in broken else replay(
                        tokens, rooms[k], set(eos), params, decode_token)
                    if result is None:
                        retry.append(k)
                    else:
                        results[k] = result
                if on_token:
                    on_token(produced)
            if stats is not None and retry:
                key = "out_of_step_retried" if attempt == 1 else "out_of_step"
                stats[key] = stats.get(key, 0) + len(retry)
            todo = retry
            if not todo:
                break
    for k in todo:
        results[k] = HDResult(tokens=[], finish_reason="out_of_step")
    return results
