"""The demo's task family (make demo): its corpus, its held-out items, and the recipe on it with
the real model."""

import importlib.util
from pathlib import Path

import pytest
from opsft.data.datasets import ADDITION, addition_corpus, column_addition, question_key

DEMO = Path(__file__).resolve().parents[1] / "workflows" / "demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("opsft_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_column_addition_is_right_for_every_pair_of_terms():
    for a in [*range(120), 999, 1234]:
        for b in range(120):
            lines = column_addition(f"{a} + {b}").splitlines()
            assert lines[-1] == f"#### {a + b}"
            ones = a % 10 + b % 10
            assert lines[1] == f"Ones column: {a % 10} + {b % 10} + 0 = {ones}; write {ones % 10}, carry {ones // 10}."
    assert column_addition("95 + 7").splitlines()[1:4] == [
        "Ones column: 5 + 7 + 0 = 12; write 2, carry 1.", "Tens column: 9 + 0 + 1 = 10; write 0, carry 1.",
        "The last carry 1 is the leading digit."]
    with pytest.raises(ValueError):
        column_addition("-3 + 4")


def test_the_demo_corpus_is_deterministic_and_its_references_are_right():
    rows = addition_corpus(60, seed=0)
    assert rows == addition_corpus(60, seed=0) and rows[10:] == addition_corpus(50, seed=0, offset=10)
    for row in rows:
        a, b = (int(t) for t in row["prompt"].removeprefix("Calculate ").rstrip(".").split(" + "))
        assert row["answer"] == str(a + b) and row["response"].endswith(f"#### {a + b}")
        assert max(a, b) <= 100  # reasoning-gym's "2 digits" reaches 100


def test_the_demo_held_out_items_never_appear_in_the_corpus():
    from opsft.evaluation import task_items

    demo = load_demo()
    corpus = addition_corpus(160, seed=0)
    seen = {question_key(r["prompt"]) for r in corpus}
    for task in demo.evaluation_tasks(held_out=200, out_of_family=5):
        items = task_items(task.name, task.n, exclude=corpus, config=task.config)
        assert len(items) == task.n and len({question_key(i["prompt"]) for i in items}) == task.n
        assert not seen & {question_key(i["prompt"]) for i in items}
    assert demo.evaluation_tasks(200, 5)[0].config == ADDITION


@pytest.mark.slow
def test_self_first_on_the_demo_family_keeps_right_self_answers_and_moves_the_corpus_on_policy(real_engine):
    """The real model on 8 demo rows: a row whose greedy self-answer verifies keeps exactly that answer
    (source self); the others are rewritten; under the same (base) model the references are
    off-policy by the paper's line (mean CLL < -0.1) and the realigned rows on-policy (> -0.05)."""
    from opsft.config import RewriteConfig
    from opsft.data.chat import prompt_ids
    from opsft.engines import GenerationParams
    from opsft.recipe import rewrite_rows

    rows = addition_corpus(8, seed=0)
    params = RewriteConfig(policy="self-first", temperature=0.0, max_new_tokens=64,
                           hint_max_new_tokens=96).params()
    out = rewrite_rows(rows, real_engine, params)
    assert [r["id"] for r in out] == [r["id"] for r in rows] and not any(r.get("error") for r in out)
    tok = real_engine.tokenizer
    own = real_engine.generate([prompt_ids(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows],
                               GenerationParams(max_new_tokens=64, temperature=0.0))
    selfs = [r for r in out if r["source"] == "self"]
    assert selfs and len(selfs) < len(out)  # the model gets some right and some wrong
    for r, tokens in zip(out, own, strict=True):
        if r["source"] == "self":
            assert r["verified"] and r["response"] == r["self_response"]
            assert r["response"] == tok.decode(tokens, skip_special_tokens=True).strip()
            assert r["original_response"] == next(x["response"] for x in rows if x["id"] == r["id"])
    new = sum(r["cll"] for r in out) / len(out)
    original = sum(r["cll_original"] for r in out) / len(out)
    print(f"demo rows: sources {[r['source'] for r in out]}; mean CLL original {original:.3f} -> {new:.3f}")
    assert original < -0.1 and new > -0.05  # seen: -0.525 and +0.456, far from either line
