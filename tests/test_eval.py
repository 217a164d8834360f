"""The evaluation harness (opsft.evaluation, `opsft eval`): held-out items, verdicts by the
task's own checker, Wilson intervals, general-text NLL / CLL against a brute-force forward
pass, the table and the CLI's files.

    .venv/bin/python -m pytest -q tests/test_eval.py
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from opsft.data.datasets import gsm_symbolic_corpus, question_key, task_corpus
from opsft.engines.hf import HFEngine
from opsft.evaluation import (
    EvalTask,
    evaluate_model,
    results_table,
    task_accuracy,
    task_items,
    text_passages,
    text_retention,
    wilson_interval,
)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model, tokenizer):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield HFEngine(model_and_tokenizer=(tiny_model, tokenizer), device="cpu")
    torch.set_num_threads(before)


class Scripted:
    """An engine whose generations are given texts (one per prompt, in order); scoring is real."""

    def __init__(self, engine, texts):
        self.engine, self.texts = engine, list(texts)
        self.tokenizer, self.model_id, self.max_length = engine.tokenizer, "scripted", engine.max_length
        self.prompts = []

    def generate(self, prompts, params):
        self.prompts += prompts
        eot = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        out = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eot] for t in self.texts[:len(prompts)]]
        self.texts = self.texts[len(prompts):]
        return out

    def score_tokens(self, *args, **kwargs):
        return self.engine.score_tokens(*args, **kwargs)


def test_wilson_interval_matches_hand_computed_values():
    # k = 0: [0, z^2 / (n + z^2)]
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-12)
    # 5/10: centre 0.5, half = 1.96 * sqrt(0.025 + 0.0096040) / 1.38416
    low, high = wilson_interval(5, 10)
    half = 1.96 * (0.025 + 1.96**2 / 400) ** 0.5 / (1 + 1.96**2 / 10)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook figure
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_task_specs_parse_and_reject_bad_ones():
    assert EvalTask.parse("gsm_symbolic") == EvalTask("gsm_symbolic", 50, 256)
    assert EvalTask.parse("chain_sum:7", n=3, max_new_tokens=9) == EvalTask("chain_sum", 7, 9)
    assert EvalTask.parse("chain_sum:7:32") == EvalTask("chain_sum", 7, 32)
    for bad in ("", "a:b", "x:1:2:3", "x:0"):
        with pytest.raises(ValueError, match="bad task"):
            EvalTask.parse(bad)
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        task_items("gsm_symbolicc", 2)


def test_items_are_deterministic_and_never_training_questions():
    items = task_items("basic_arithmetic", 6, seed=5)
    assert items == task_items("basic_arithmetic", 6, seed=5)
    assert [i["prompt"] for i in items] == [r["prompt"] for r in task_corpus("basic_arithmetic", 6, seed=5)]
    # excluding the first three questions (as a training corpus would) replaces them by later items
    train = [dict(r, response="x") for r in task_corpus("basic_arithmetic", 3, seed=5)]
    held = task_items("basic_arithmetic", 6, seed=5, exclude=train)
    assert not {question_key(i["prompt"]) for i in held} & {question_key(r["prompt"]) for r in train}
    assert [i["prompt"] for i in held[:3]] == [i["prompt"] for i in items[3:]]
    assert len({i["prompt"] for i in held}) == 6


def test_accuracy_uses_the_tasks_own_checker(tiny_engine, tokenizer):
    items = task_items("gsm_symbolic", 3, seed=2)
    texts = [f"Some work.\n#### {items[0]['answer']}",                # right, gsm style
             f"So the answer is {float(items[1]['answer']) + 1:g}.",   # wrong
             f"The result is \\boxed{{{items[2]['answer']}}}"]         # right, boxed
    engine = Scripted(tiny_engine, texts)
    summary, records = task_accuracy(engine, items, max_new_tokens=8)
    assert [r["correct"] for r in records] == [True, False, True]
    assert summary["correct"] == 2 and summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert all(r["finished"] for r in records) and records[0]["extracted"] == items[0]["answer"]
    # the prompt is the question as the only user turn of the chat template
    decoded = tokenizer.decode(engine.prompts[0])
    assert items[0]["prompt"] in decoded and decoded.count("<|im_start|>user") == 1


def test_text_retention_equals_a_brute_force_forward(tiny_engine, tiny_model, tokenizer):
    passages = text_passages(tokenizer, 3, 24)
    # consecutive windows of the pydoc text
    from opsft.evaluation import general_text

    ids = tokenizer(general_text(), add_special_tokens=False)["input_ids"]
    assert passages == [ids[0:24], ids[24:48], ids[48:72]]
    got = text_retention(tiny_engine, passages)
    with torch.no_grad():
        logits = tiny_model(torch.tensor(passages)).logits.double()
    logp_all = torch.log_softmax(logits[:, :-1], -1)
    target = torch.tensor(passages)[:, 1:]
    logp = logp_all.gather(-1, target[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    assert got["tokens"] == 3 * 23 and got["passages"] == 3
    assert got["nll"] == pytest.approx(float(-logp.mean()), abs=1e-4)
    assert got["cll"] == pytest.approx(float((logp + entropy).mean()), abs=1e-4)


def test_evaluate_model_and_table(tiny_engine):
    items = task_items("basic_arithmetic", 2, seed=1234)
    engine = Scripted(tiny_engine, [f"#### {items[0]['answer']}", "#### nope", "#### 1", "#### 2"])
    tasks = [EvalTask("basic_arithmetic", 2, 4), EvalTask("chain_sum", 2, 4)]
    result, records = evaluate_model(engine, tasks, family={"basic_arithmetic"}, passages=2, tokens_per_passage=16)
    assert result["tasks"]["basic_arithmetic"]["correct"] == 1 and result["tasks"]["basic_arithmetic"]["in_family"]
    assert not result["tasks"]["chain_sum"]["in_family"]
    assert result["in_family_accuracy"] == 0.5 and len(records) == 4
    other = json.loads(json.dumps(result))
    other["general_text"]["nll"] += 0.25
    table = results_table([result, other], ["base", "tuned"])
    lines = table.splitlines()
    assert "basic_arithmetic (in)" in lines[0] and "chain_sum" in lines[0]
    assert lines[2].startswith("| base | 0.50 (1/2) |") and lines[2].endswith("| 0.0000 |")
    assert lines[3].endswith("| 0.2500 |")


def test_cli_eval_writes_json_table_and_items(tiny_model, tokenizer, tmp_path, capsys):
    from opsft.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    rows = gsm_symbolic_corpus(2, seed=1234)  # the eval seed's first items: they must be skipped
    train.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["eval", "--model", f"a={model_dir}", "--model", f"b={model_dir}", "--tasks", "gsm_symbolic:2:3",
                 "--exclude", str(train), "--passages", "1", "--tokens-per-passage", "16",
                 "--output", str(tmp_path / "out")])
    assert code == 0
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    a, b = data["results"]
    assert [a["label"], b["label"]] == ["a", "b"]
    assert a["general_text"]["nll"] == pytest.approx(b["general_text"]["nll"], abs=1e-9)  # same weights
    items = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    assert len(items) == 4 and not {i["prompt"] for i in items} & {r["prompt"] for r in rows}
    assert "| a |" in capsys.readouterr().out
    assert main(["eval", "--model", f"x={model_dir}", "--model", f"x={model_dir}", "--tasks", "chain_sum:1"]) == 2


@pytest.mark.slow
def test_real_model_knows_english_better_than_shuffled_english(real_engine, tokenizer):
    """The embedded model's NLL on the pydoc text is far below its NLL on the same tokens shuffled."""
    passages = text_passages(tokenizer, 4, 128)
    rng = random.Random(0)
    shuffled = [rng.sample(p, len(p)) for p in passages]
    real, noise = text_retention(real_engine, passages), text_retention(real_engine, shuffled)
    assert 0.5 < real["nll"] < 4.0 and noise["nll"] > real["nll"] + 2.0
    assert real["cll"] > noise["cll"]


def test_tasks_with_generator_settings_and_labels(tiny_engine):
    from opsft.config import EvalConfig

    easy = {"min_terms": 2, "max_terms": 2, "max_digits": 1}
    cfg = EvalConfig(tasks=["chain_sum:2:4", {"name": "chain_sum", "label": "chain_sum_easy", "n": 3,
                                              "max_new_tokens": 4, "config": easy}])
    tasks = [EvalTask.from_spec(t) for t in cfg.tasks]
    assert tasks[1] == EvalTask("chain_sum", 3, 4, easy, "chain_sum_easy") and tasks[1].key == "chain_sum_easy"
    items = task_items("chain_sum", 3, config=easy)
    # the generator settings reach reasoning-gym: two one-digit terms, and the ids say which settings
    for item in items:
        expression = item["prompt"].rsplit(":", 1)[1].strip().rstrip("=").split()
        assert len(expression) == 3 and all(len(t) == 1 for t in expression[::2])
        assert int(item["answer"]) == eval(" ".join(expression))  # the checker's reference, independently
    assert items[0]["id"] != task_items("chain_sum", 1)[0]["id"]
    result, records = evaluate_model(Scripted(tiny_engine, ["#### 0"] * 5), tasks, passages=0)
    assert set(result["tasks"]) == {"chain_sum", "chain_sum_easy"} and result["tasks"]["chain_sum_easy"]["n"] == 3
    assert {r["task_label"] for r in records} == {"chain_sum", "chain_sum_easy"}
    with pytest.raises(ValueError, match="given twice"):
        evaluate_model(Scripted(tiny_engine, ["1"] * 4), [tasks[0], tasks[0]], passages=0)
    # settings the task refuses (here only when it makes its first item) name the task and the settings
    refused = r"task 'simple_equations' with settings .*'operators'.*: The number of weights"
    with pytest.raises(ValueError, match=refused):
        task_items("simple_equations", 2, config={"operators": ["+", "-"]})
