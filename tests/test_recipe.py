"""The on-policy data recipe (opsft.recipe) and `opsft rewrite`: routing of rows between the
model's own answers, hinted decoding and the original response; fields; bad rows; CLL.

    .venv/bin/python -m pytest -q tests/test_recipe.py
"""

from __future__ import annotations

import json

import pytest
import torch
from opsft.data.chat import end_of_turn_id, prompt_ids
from opsft.data.datasets import gsm_symbolic_corpus, train_eval_split
from opsft.data.hints import HINT_SYSTEM_PROMPT, OUTPUT_STOPS
from opsft.engines.base import GenerationParams
from opsft.engines.hf import HFEngine
from opsft.method.hinted_params import HDParams
from opsft.recipe import recipe_summary, rewrite_rows, split_dropped
from opsft.recipe_plan import RewriteParams
from opsft.scoring import score_rows


class EndingStream:
    """A decode stream whose model ends every output at its `ends_after`-th token (the end-of-turn
    logit lifted above all others from then on): a random tiny model never ends by itself, and
    the recipe keeps only outputs that did."""

    def __init__(self, stream, eos: int, ends_after: int):
        self.stream, self.eos, self.ends_after, self.steps = stream, eos, ends_after, 0

    @property
    def items(self):
        return self.stream.items

    def _ending(self, logits):
        if self.steps + 1 < self.ends_after:
            return logits
        logits = logits.clone()
        logits[:, self.eos] = logits.max() + 10.0
        return logits

    @property
    def last_logits(self):
        return self._ending(self.stream.last_logits)

    def step(self, tokens):
        out = self.stream.step(tokens)
        self.steps += 1
        return self._ending(out)

    def keep(self, items):
        self.stream.keep(items)


class ForcedStream(EndingStream):
    """A decode stream whose model writes `script` (token ids), then ends."""

    def __init__(self, stream, eos: int, script: list[int]):
        super().__init__(stream, eos, len(script) + 1)
        self.script = script

    def _ending(self, logits):
        if self.steps >= len(self.script):
            return super()._ending(logits)
        logits = logits.clone()
        logits[:, self.script[self.steps]] = logits.max() + 10.0
        return logits


class ScriptedHints:
    """An HFEngine on the tiny model whose *hint* generations are scripted (a random model never
    writes "# CoT"); self-answers, hinted decoding and CLL scoring are real, and with ends_after
    every self-answer and hinted-decoding output ends at that many tokens (EndingStream)."""

    def __init__(self, engine: HFEngine, hint_text: str | None, ends_after: int | None = None,
                 output_script: str | None = None):
        self.engine, self.hint_text, self.ends_after = engine, hint_text, ends_after
        self.output_script = output_script  # every hinted-decoding output is this text (ForcedStream)
        self.eos = end_of_turn_id(engine.tokenizer)
        self.tokenizer, self.model, self.model_id = engine.tokenizer, engine.model, "tiny"
        self.max_length = engine.max_length
        self.hint_calls = self.self_calls = 0
        self.marker = self.tokenizer(HINT_SYSTEM_PROMPT[:60], add_special_tokens=False)["input_ids"][3:8]

    def _is_hint(self, prompt: list[int]) -> bool:
        m = self.marker
        return any(prompt[i:i + len(m)] == m for i in range(len(prompt) - len(m) + 1))

    def generate(self, prompts, params):
        hint = [self._is_hint(p) for p in prompts]
        self.hint_calls += sum(hint)
        self.self_calls += len(prompts) - sum(hint)
        real = self.engine.generate(prompts, params)
        if self.ends_after:
            real = [r if len(r) < self.ends_after else r[:self.ends_after - 1] + [self.eos] for r in real]
        scripted = self.tokenizer(self.hint_text or "no marker", add_special_tokens=False)["input_ids"]
        return [scripted if h else r for h, r in zip(hint, real, strict=True)]

    def score_tokens(self, *args, **kwargs):
        return self.engine.score_tokens(*args, **kwargs)

    def open_stream(self, *args, **kwargs):  # hinted decoding runs on the real engine
        stream = self.engine.open_stream(*args, **kwargs)
        if self.output_script is not None:
            return ForcedStream(stream, self.eos, self.tokenizer(self.output_script, add_special_tokens=False)[
                "input_ids"])
        return EndingStream(stream, self.eos, self.ends_after) if self.ends_after else stream


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    """A 2-layer random Llama with the real vocabulary and room for the ~800-token hint prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_engine(tiny_lm, tokenizer):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is faster, and the machine is shared
    yield HFEngine(model_and_tokenizer=(tiny_lm, tokenizer), device="cpu")
    torch.set_num_threads(before)


ROWS = [
    {"id": "a", "prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is \\boxed{5}.", "answer": "5"},
    {"id": "b", "prompt": "What is 4 + 4?", "response": "4 + 4 = 8.\n#### 8", "answer": "8"},
    {"id": "c", "prompt": "What is 9 - 2?", "response": "9 - 2 = 7.\n#### 7"},  # answer from the response
    {"id": "bad", "response": "orphan"},                                          # no prompt
]
FAST = HDParams(temperature=0, max_new_tokens=6, splitter=None)


def routing_verifier(calls):
    """Accepts the self-answer of row a and the HD output of row b only; records what it saw."""
    def verify(text, reference, row):
        calls.append((row["id"], reference))
        return (row["id"] == "a" and row.get("source") is None) or (row["id"] == "b" and row.get("source") is None
                                                                      and calls.count((row["id"], reference)) == 2)
    return verify


def test_self_first_routes_rows_and_keeps_every_row(tiny_engine, tokenizer):
    engine = ScriptedHints(tiny_engine, "# Analyze\nfine\n# CoT", ends_after=4)
    calls = []
    out = rewrite_rows(ROWS, engine, RewriteParams(hd=FAST, hint_max_new_tokens=4), routing_verifier(calls))
    assert [r["id"] for r in out] == ["a", "b", "c", "bad"]
    a, b, c, bad = out
    # a: the model's own greedy answer, verified, kept as it is
    own = tiny_engine.generate([prompt_ids(tokenizer, [{"role": "user", "content": ROWS[0]["prompt"]}])],
                               GenerationParams(max_new_tokens=6, temperature=0.0))[0][:3]  # then it ends
    assert a["source"] == "self" and a["verified"] is True
    assert a["response"] == tokenizer.decode(own, skip_special_tokens=True).strip()
    assert a["original_response"] == ROWS[0]["response"] and a["hd_response"] is None
    assert a["self_response"] == a["response"] and a["self_verified"] is True
    # the rejected self-answers are kept (the rejected side of a preference pair)
    assert b["self_verified"] is False and c["self_verified"] is False and c["self_response"] != c["response"]
    # b: hinted decoding accepted
    assert b["source"] == "hd" and b["verified"] is True and b["response"] == b["hd_response"]
    assert b["hd_tokens"] == 4 and b["finish_reason"] == "eos"
    # c: HD rejected -> original response kept, verified false; its reference came from "#### 7"
    assert c["source"] == "original" and c["verified"] is False and c["response"] == ROWS[2]["response"]
    assert ("c", "7") in calls
    # bad row: reported on the row, nothing else touched
    assert bad["error"] and bad["source"] is None and bad["response"] == "orphan"
    # three self-answers, then hints only for the two rejected rows
    assert engine.self_calls == 3 and engine.hint_calls == 2
    # CLL of the new and of the original response, as opsft.scoring computes them
    expect = score_rows([{"prompt": r["prompt"], "response": r["response"]} for r in (a, b, c)], tiny_engine)
    orig = score_rows([{"prompt": ROWS[i]["prompt"], "response": ROWS[i]["response"]} for i in range(3)], tiny_engine)
    for row, e, o in zip((a, b, c), expect, orig, strict=True):
        assert row["cll"] == pytest.approx(e["cll"], abs=1e-9)
        assert row["cll_original"] == pytest.approx(o["cll"], abs=1e-9)
    summary = recipe_summary(out)
    assert summary["sources"] == {"self": 1, "hd": 1, "original": 1} and summary["error_rows"] == 1


def test_hd_all_and_no_hint(tiny_engine):
    engine = ScriptedHints(tiny_engine, "an analysis that never gives the marker")
    out = rewrite_rows(ROWS[:2], engine, RewriteParams(policy="hd-all", hd=FAST, hint_max_new_tokens=4,
                                                       missing_hint="skip"), lambda *a: True)
    assert engine.self_calls == 0 and engine.hint_calls == 2
    assert all(r["self_response"] is None and r["self_verified"] is None for r in out)
    assert all(r["hint_forced"] is False for r in out)  # skip, the official rule: the row keeps its reference
    assert all(r["finish_reason"] == "no_hint" and r["source"] == "original" and r["verified"] is False for r in out)
    assert [r["response"] for r in out] == [r["response"] for r in ROWS[:2]]


@pytest.mark.parametrize(("cut", "line"), [("line", "# CoT:\n"), ("marker", "# CoT")])
@pytest.mark.parametrize(("hint", "before"), [("an analysis that never gives the marker",
                                               "an analysis that never gives the marker\n\n"),
                                              ("# Analyze\n", ""), ("# CoT", "")])
def test_missing_hint_cot_opens_the_stream_at_the_marker_line(tiny_engine, tokenizer, cut, line, hint, before):
    """A hint without a usable analysis ended by its marker: under missing_hint "cot" the hinted
    stream opens at the marker line, after the analysis when there is one. The tiny model never
    ends by itself, so every output runs to max_length: decoded, counted, and not accepted."""
    engine = ScriptedHints(tiny_engine, hint)
    params = RewriteParams(policy="hd-all", hd=HDParams(temperature=0.0, max_new_tokens=5, splitter=None),
                           hint_max_new_tokens=4, missing_hint="cot", hint_cut=cut)
    out = rewrite_rows(ROWS[:2], engine, params, lambda text, ref, row: True)
    assert all(r["hint_forced"] is True and r["finish_reason"] == "max_length" for r in out)
    assert all(r["source"] == "original" and r["verified"] is False for r in out)  # a runaway is never kept
    assert recipe_summary(out)["hinted_decoding"] == {
        "rows": 2, "accepted": 0, "forced_hints": 2, "eos": 0, "stop": 0, "no_hint": 0, "empty": 0,
        "out_of_step": 0, "max_length": 2, "repetition": 0}
    # the hinted stream is the hint chat + (analysis) + the marker line: the same tokens as decoding by
    # hand from that prompt
    from opsft.data.chat import response_ids
    from opsft.data.hints import hint_messages
    from opsft.engines.hf_streams import ModelStreams
    from opsft.method.hinted import hinted_decode
    from opsft.method.hinted_params import HDItem

    row = ROWS[0]
    item = HDItem(hinted_prompt=prompt_ids(tokenizer, hint_messages(row["prompt"], row["response"]))
                  + response_ids(tokenizer, before + line),
                  student_prompt=prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}]))
    expect = hinted_decode(ModelStreams(tiny_engine.model, tokenizer.pad_token_id or 0), [item], params.hd,
                           {end_of_turn_id(tokenizer)})[0]
    assert out[0]["hd_tokens"] == len(expect.tokens)
    assert out[0]["hd_response"] == tokenizer.decode(expect.tokens, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="missing_hint"):
        RewriteParams(missing_hint="sometimes")


@pytest.mark.parametrize(("script", "text", "reason", "source"), [
    ("The sum is 5.\n\n# Question:\nWhat is 6 + 6?", "The sum is 5.", "stop", "hd"),  # cut at the header
    ("# Question:\nWhat is 6 + 6?", "", "empty", "original"),                         # nothing before it
    ("  \n", None, "eos", "original"),  # blank, then the end: held until the model writes something
])
def test_outputs_that_invent_a_question_or_say_nothing(tiny_engine, script, text, reason, source):
    engine = ScriptedHints(tiny_engine, "# Analyze\n2 + 3 = 5.\n# CoT", output_script=script)
    params = RewriteParams(policy="hd-all", hd=HDParams(temperature=0.0, max_new_tokens=24, splitter=None,
                                                        stop_strings=OUTPUT_STOPS, hold_eos=True))
    out = rewrite_rows(ROWS[:1], engine, params, lambda text, ref, row: "5" in text)
    if text is None:
        text = out[0]["hd_response"]
        assert text.strip() and out[0]["hd_tokens"] > len(engine.tokenizer(script)["input_ids"]) + 1
    assert (out[0]["hd_response"], out[0]["finish_reason"], out[0]["source"]) == (text, reason, source)
    assert out[0]["response"] == (text if source == "hd" else ROWS[0]["response"])
    outcomes = recipe_summary(out)["hinted_decoding"]
    assert outcomes[reason] == 1 and outcomes["accepted"] == (source == "hd") and outcomes["rows"] == 1


def test_generation_stops_at_a_stop_string_split_across_tokens(tiny_engine, tokenizer):
    """hf generate with stop strings: each output is its plain greedy output up to the token that
    completes the string (found here by brute force on the plain outputs), nothing after."""
    from opsft.data.chat import TokenText

    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "Name a colour.")]
    plain = tiny_engine.generate(prompts, GenerationParams(max_new_tokens=12))
    text = TokenText(tokenizer)
    pieces = [text(t) for t in plain[0]]
    k = next(i for i in range(1, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[k][-1] + pieces[k + 1][0]
    got = tiny_engine.generate(prompts, GenerationParams(max_new_tokens=12, stop_strings=(stop,)))
    for g, p in zip(got, plain, strict=True):
        n = next((n for n in range(1, len(p) + 1) if stop in "".join(text(t) for t in p[:n])), len(p))
        assert g == p[:n]
    assert len(got[0]) <= k + 2


def test_drop_unverified_marks_and_splits(tiny_engine):
    engine = ScriptedHints(tiny_engine, "# Analyze\n# CoT")
    out = rewrite_rows(ROWS, engine, {"policy": "hd-all", "temperature": 0, "max_new_tokens": 5, "splitter": None,
                                      "hint_max_new_tokens": 4, "drop_unverified": True}, lambda *a: False)
    kept, dropped = split_dropped(out)
    assert [r["id"] for r in dropped] == ["a", "b", "c"] and [r["id"] for r in kept] == ["bad"]
    with pytest.raises(ValueError, match="policy"):
        RewriteParams(policy="sometimes")


def test_the_stages_one_batch_at_a_time_equal_rewrite_rows(tiny_engine):
    """What the Ray job does: each stage over batches of rows, the rows pickled between stages
    (as they travel between actors), against rewrite_rows over all rows in one process."""
    import pickle

    from opsft.recipe import rewrite_stage, stages_for

    params = {"policy": "self-first", "temperature": 0, "max_new_tokens": 5, "splitter": None,
              "hint_max_new_tokens": 4, "missing_hint": "cot"}
    rows = ROWS + [{"id": f"x{i}", "prompt": f"What is {i} + 1?", "response": f"#### {i + 1}"} for i in range(3)]
    def accept(text, reference, row):  # the self-answer of a, the hinted-decoding output of x1
        return row["id"] == "a" or (row["id"] == "x1" and row.get("hd_response") is not None)

    want = rewrite_rows(rows, ScriptedHints(tiny_engine, "# Analyze\n# CoT", ends_after=4), params, accept)
    engine = ScriptedHints(tiny_engine, "# Analyze\n# CoT", ends_after=4)
    got = rows
    for i, stage in enumerate(stages_for("self-first")):
        batches = [got[:3], got[3:]]
        got = [pickle.loads(pickle.dumps(r)) for b in batches
               for r in rewrite_stage(b, None if stage.startswith("verify") else engine, stage, params,
                                      first=i == 0, verifier=accept)]
    cll = ("cll", "cll_original")  # float32 scores of other batches: equal to float32 rounding
    assert [{k: v for k, v in r.items() if k not in cll} for r in got] == \
        [{k: v for k, v in r.items() if k not in cll} for r in want]
    for r, w in zip(got, want, strict=True):
        if not r.get("error"):
            assert [r[k] for k in cll] == pytest.approx([w[k] for k in cll], abs=1e-5)
    assert all("_rewrite" not in r for r in got)
    assert [r["source"] for r in got] == ["self", "original", "original", None, "original", "hd", "original"]


def test_engine_capabilities_are_what_the_classes_can_do():
    from opsft.engines.base import CAPABILITIES
    from opsft.engines.vllm import VLLMEngine

    methods = {"score": ("score_tokens",), "generate": ("generate",), "decode": ("open_stream", "hinted_decode")}
    for kind, cls in {"hf": HFEngine, "vllm": VLLMEngine}.items():
        assert CAPABILITIES[kind] == {cap for cap, names in methods.items() if any(hasattr(cls, n) for n in names)}


def test_a_stage_whose_engine_cannot_do_it_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    from opsft.cli import main
    from opsft.config import RewriteConfig
    from opsft.engines import base
    from opsft.stages import check_stages

    check_stages(RewriteConfig(engine={"kind": "vllm"}))  # vllm can do every stage
    # an engine kind without the decode capability (as vllm was before opsft.engines.vllm_hd)
    monkeypatch.setitem(base.CAPABILITIES, "vllm", frozenset({"score", "generate"}))
    with pytest.raises(ValueError, match="stage hinted-decoding needs an engine that can decode; engine 'vllm'"):
        check_stages(RewriteConfig(engine={"kind": "vllm"}))
    check_stages(RewriteConfig(engine={"kind": "vllm"}, stages={"hinted-decoding": {"engine": {"kind": "hf"}}}))
    cfg = RewriteConfig(engine={"kind": "vllm", "model": "/m"}, stages={"hinted-decoding": {"engine": {"kind": "hf"}}})
    assert cfg.stage_engine("hinted-decoding").kind == "hf" and cfg.stage_engine("hinted-decoding").model == "/m"
    assert cfg.stage_engine("score").kind == "vllm"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n")
    for extra in ([], ["--ray"]):  # refused in one line, before any model loads or Ray starts
        code = main(["rewrite", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--engine", "vllm",
                     *extra])
        err = capsys.readouterr().err
        assert code == 2 and "stage hinted-decoding needs an engine that can decode" in err, err
        assert not (tmp_path / "out.jsonl").exists()


def test_corpus_generators_are_deterministic_and_disjoint():
    rows = gsm_symbolic_corpus(3, seed=1, offset=2)
    assert rows == gsm_symbolic_corpus(5, seed=1)[2:]
    assert all(r["response"].rstrip().endswith(f"#### {r['answer']}") for r in rows)
    train, held = train_eval_split(20, 10, seed=1)
    assert len(train) == 20 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_cli_rewrite_end_to_end(tiny_lm, tokenizer, tmp_path):
    from opsft.cli import main

    model_dir = tmp_path / "tiny"
    tiny_lm.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in ROWS) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    code = main(["rewrite", "--input", str(src), "--output", str(out), "--model", str(model_dir), "--temperature",
                 "0", "--max-new-tokens", "4", "--hint-max-new-tokens", "4", "--splitter", ""])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and rows[4]["error"].startswith("line 5")
    for row in rows[:3]:
        assert set(row) >= {"original_response", "source", "verified", "finish_reason", "cll", "cll_original"}
        assert row["cll"] is not None and row["cll_original"] is not None


@pytest.mark.slow
def test_real_model_answers_an_easy_question_itself(real_engine):
    rows = [{"id": "easy", "prompt": "What is 2 + 3? Reply with just the number.", "response": "#### 5",
             "answer": "5"}]
    out = rewrite_rows(rows, real_engine, RewriteParams(hd=HDParams(max_new_tokens=16)))
    assert out[0]["source"] == "self" and out[0]["verified"] is True and "5" in out[0]["response"]
    assert out[0]["cll"] > out[0]["cll_original"]  # its own answer is more on-policy than "#### 5"


def test_recipe_defaults_are_the_configs():
    """RewriteConfig (the CLI's and the jobs' settings) and RewriteParams (the recipe's) name the same
    defaults: the recipe built from an empty config equals the recipe's own default."""
    from opsft.config import RewriteConfig

    assert RewriteConfig().params() == RewriteParams.from_fields({}) == RewriteParams()
    assert RewriteParams().hd.temperature == RewriteConfig().temperature == 0.0  # the study's choice
    assert RewriteParams().hd.stop_strings == OUTPUT_STOPS and RewriteParams().hd.hold_eos
