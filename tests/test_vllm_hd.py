"""opsft.engines.vllm_hd without vLLM: its logits processor and driver against a simulated vLLM
(FakeLLM: the offline generate loop over a persistent batch, a transformers model for logits, a
greedy sampler, stop ids and max_tokens), so the pairing and the out-of-step path are checked
deterministically in the main venv. The results must equal the hf decoder's (hinted_decode) on
the same float64 model; a request left out of one step (what a vLLM preemption does) must be
detected, decoded again and still come out equal. The real engine: tests/test_vllm_engine.py.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from opsft.data.chat import TokenText
from opsft.engines.batching import token_groups
from opsft.engines.hf_streams import ModelStreams
from opsft.engines.vllm_hd import HintedPairs, MoveDirectionality, hinted_decode_vllm, replay
from opsft.method.hinted import hinted_decode
from opsft.method.hinted_params import HDItem, HDParams


class FakeSamplingParams:
    def __init__(self, max_tokens, temperature, ignore_eos, stop_token_ids, detokenize, extra_args):
        self.max_tokens, self.stop_token_ids, self.extra_args = max_tokens, set(stop_token_ids), extra_args
        assert temperature == 0.0 and ignore_eos and not detokenize  # the processor picks; vLLM's sampler is greedy


class FakeLLM:
    """vLLM's offline loop, simulated: every request of a generate call is queued before the first
    step (the engine core in-process); a step schedules every unfinished request except those
    `leave_out(call, step, request_index)` names; the persistent batch keeps rows in place, reuses
    removed indices for added requests and fills holes by moving the last row (as vLLM's InputBatch
    does), and tells the processor in BatchUpdate form; logits by a full forward pass per request."""

    def __init__(self, model, tokenizer_path: str, max_model_len: int = 512, leave_out=None, max_num_seqs=256):
        self.model, self.leave_out, self.calls = model, leave_out or (lambda call, step, r: False), 0
        config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len, tokenizer=tokenizer_path),
                                 scheduler_config=SimpleNamespace(max_num_batched_tokens=8192,
                                                                  max_num_seqs=max_num_seqs),
                                 cache_config=SimpleNamespace(num_gpu_blocks=None, block_size=16))
        self.llm_engine = SimpleNamespace(vllm_config=config)
        self.processor = HintedPairs(config, torch.device("cpu"), False)

    @torch.inference_mode()
    def generate(self, prompts, params, use_tqdm=False):
        reqs = [SimpleNamespace(prompt=list(p["prompt_token_ids"]), out=[], params=sp, done=False)
                for p, sp in zip(prompts, params, strict=True)]
        rows: list[int] = []  # persistent batch: row index -> request
        step = 0
        while not all(r.done for r in reqs):
            wanted = [i for i, r in enumerate(reqs) if not r.done and not self.leave_out(self.calls, step, i)]
            removed = [k for k, i in enumerate(rows) if i not in wanted]
            new = [i for i in wanted if i not in rows]
            added = []
            for k in sorted(removed):  # a removed slot is taken by an added request
                if new:
                    rows[k] = new.pop(0)
                    added.append(k)
            moved = []
            holes = sorted(k for k in removed if k not in added)
            while holes:  # condense: the last row moves into the lowest hole
                last = len(rows) - 1
                if last in holes:
                    holes.remove(last)
                    rows.pop()
                    continue
                hole = holes.pop(0)
                rows[hole] = rows.pop()
                moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
            for i in new:
                rows.append(i)
                added.append(len(rows) - 1)
            self.processor.update_state(SimpleNamespace(
                batch_size=len(rows), removed=[k for k in removed if k not in added],
                added=[(k, reqs[rows[k]].params, reqs[rows[k]].prompt, reqs[rows[k]].out) for k in added],
                moved=moved))
            logits = torch.stack([self.model(torch.tensor([reqs[i].prompt + reqs[i].out])).logits[0, -1].float()
                                  for i in rows]) if rows else torch.empty(0)
            if rows:
                picked = self.processor.apply(logits.clone()).argmax(-1).tolist()
                for i, token in zip(rows, picked, strict=True):
                    r = reqs[i]
                    r.out.append(token)
                    r.done = (token in r.params.stop_token_ids or len(r.out) >= r.params.max_tokens
                              or len(r.prompt) + len(r.out) >= self.llm_engine.vllm_config.model_config.max_model_len)
            step += 1
        self.calls += 1
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=r.out)]) for r in reqs]


@pytest.fixture(scope="module")
def lm64(tokenizer):
    """A 2-layer random Llama in float64 whose greedy outputs vary with the context: the cached,
    padded hf decoder and the fake's full recomputation then agree far below any token gap."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval().to(torch.float64)


@pytest.fixture()
def fake_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=FakeSamplingParams))


def items_of(tokenizer) -> list[HDItem]:
    from opsft.data.chat import prompt_ids

    questions = ["What is 12 + 30?", "Name a colour.", "Tom has 3 apples and buys 4 more. How many now?", "Hi."]
    return [HDItem(hinted_prompt=prompt_ids(tokenizer, [{"role": "system", "content": "The answer is 42. " * (k + 1)},
                                                        {"role": "user", "content": q}]),
                   student_prompt=prompt_ids(tokenizer, [{"role": "user", "content": q}]), seed=k)
            for k, q in enumerate(questions)]


def check_equal(got, want):
    assert [(r.tokens, r.finish_reason, r.switched_at) for r in got] == \
        [(r.tokens, r.finish_reason, r.switched_at) for r in want]


@pytest.mark.parametrize("temperature", [0.0, 0.3])
def test_paired_decoding_equals_the_hf_decoder(lm64, tokenizer, model_dir, fake_vllm, temperature):
    items = items_of(tokenizer)
    eos = {tokenizer.eos_token_id}
    plain = hinted_decode(ModelStreams(lm64), items,
                          HDParams(beta=0.7, temperature=temperature, max_new_tokens=10, splitter=None), eos)
    # a splitter from item 0's 4th token: item 0 (at least) switches to the student stream mid-way
    splitter = tokenizer.decode([plain[0].tokens[3]])
    assert splitter.strip()
    params = HDParams(beta=0.7, temperature=temperature, max_new_tokens=10, splitter=splitter)
    decode_token = TokenText(tokenizer)
    want = hinted_decode(ModelStreams(lm64), items, params, eos, decode_token=decode_token)
    assert want[0].switched_at is not None
    stats = {}
    got = hinted_decode_vllm(FakeLLM(lm64, model_dir), items, params, eos, decode_token=decode_token, stats=stats)
    check_equal(got, want)
    assert stats == {}


@pytest.mark.parametrize("temperature", [0.0, 0.3])
def test_held_eos_and_stop_strings_equal_the_hf_decoder(lm64, tokenizer, model_dir, fake_vllm, temperature):
    """The recipe's rules in the processor: every item's plain first token made an eos id and held
    while the output is blank (pass 1 picks it too), and a stop string split across tokens ends an
    item with a forced end that the driver drops."""
    items = items_of(tokenizer)
    decode_token = TokenText(tokenizer)
    base = {"beta": 0.7, "temperature": temperature, "max_new_tokens": 10, "splitter": None}
    plain = hinted_decode(ModelStreams(lm64), items, HDParams(**base), {tokenizer.eos_token_id})
    eos = {tokenizer.eos_token_id} | {r.tokens[0] for r in plain}
    held = hinted_decode(ModelStreams(lm64), items, HDParams(**base, hold_eos=True), eos, decode_token=decode_token)
    pieces = [decode_token(t) for t in held[2].tokens]  # a stop string split across two tokens of item 2
    k = next(i for i in range(1, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    for fields in ({"hold_eos": True}, {"hold_eos": True, "stop_strings": (pieces[k][-1] + pieces[k + 1][0],)}):
        params = HDParams(**base, **fields)
        want = hinted_decode(ModelStreams(lm64), items, params, eos, decode_token=decode_token)
        assert all(r.tokens[0] not in eos for r in want)
        stats = {}
        got = hinted_decode_vllm(FakeLLM(lm64, model_dir), items, params, eos, decode_token=decode_token, stats=stats)
        check_equal(got, want)
        assert stats == {}
    assert want[2].finish_reason == "stop"
    assert replay(want[2].tokens + [min(eos)], 10, eos, params, decode_token).tokens == want[2].tokens


def test_a_request_left_out_of_a_step_is_detected_and_decoded_again(lm64, tokenizer, model_dir, fake_vllm):
    items = items_of(tokenizer)
    eos = {tokenizer.eos_token_id}
    params = HDParams(beta=3.0, temperature=0.0, max_new_tokens=8, splitter=None)
    want = hinted_decode(ModelStreams(lm64), items, params, eos)
    # call 0 is pass 1; in call 1 (pass 2, one wave: h0 s0 h1 s1 ...) item 1's student (request 3)
    # misses step 2, as a preempted request would
    llm = FakeLLM(lm64, model_dir, leave_out=lambda call, step, r: (call, step, r) == (1, 2, 3))
    stats = {}
    check_equal(hinted_decode_vllm(llm, items, params, eos, stats=stats), want)
    assert stats == {"out_of_step_retried": 1} and llm.calls == 3  # pass 1, the wave, item 1 alone
    # left out in every call: given up, finish reason out_of_step, the other items unharmed
    llm = FakeLLM(lm64, model_dir, leave_out=lambda call, step, r: call >= 1 and step == 2 and r == (3 if call == 1
                                                                                                     else 1))
    stats = {}
    got = hinted_decode_vllm(llm, items, params, eos, stats=stats)
    assert got[1].finish_reason == "out_of_step" and got[1].tokens == []
    check_equal([got[k] for k in (0, 2, 3)], [want[k] for k in (0, 2, 3)])
    assert stats == {"out_of_step_retried": 1, "out_of_step": 1}


def test_waves_fit_the_step_budgets():
    # the driver's waves: token_groups(prompt tokens per item, budget, max_num_seqs // 2)
    assert token_groups([5, 5, 5], 10, 128) == [[0, 1], [2]]
    assert token_groups([5, 5, 5], 100, 4 // 2) == [[0, 1], [2]]  # 2 requests per item
    assert token_groups([50, 1], 10, 128) == [[0], [1]]           # longer than the budget: alone
    assert token_groups([], 10, 2) == []


def test_replay_applies_the_stop_rules_and_drops_a_forced_end():
    params = HDParams(max_new_tokens=100, splitter=None, repeat_window=2, repeat_times=3, repeat_every=4)
    assert replay([5, 6, 9], 10, {9}, params, None).finish_reason == "eos"
    assert replay([5, 6, 7], 3, {9}, params, None).finish_reason == "max_length"
    rep = replay([1, 2, 1, 2, 1, 2, 1, 2, 9], 50, {9}, params, None)  # repeating at 8, then the forced end
    assert rep.finish_reason == "repeating" and rep.tokens == [1, 2, 1, 2, 1, 2, 1, 2]
    assert replay([5, 6], 10, {9}, params, None) is None               # ended early: out of step
    assert replay([5, 9, 7], 10, {9}, params, None) is None            # tokens past a stop: out of step
