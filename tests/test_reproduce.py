"""workflows/reproduce.py end to end on a tiny random model with tiny budgets: every stage
runs, every method trains and is evaluated, the outputs agree with each other, and a re-run
skips the finished work.

    .venv/bin/python -m pytest -q tests/test_reproduce.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_workflow():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "workflows" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # pydantic resolves the config's annotations through it
    spec.loader.exec_module(module)
    return module


def test_the_shipped_config_is_valid_and_covers_the_seven_methods():
    shipped = yaml.safe_load((ROOT / "workflows/reproduce.yaml").read_text())
    cfg = load_workflow().ReproduceConfig.model_validate(shipped)
    assert set(cfg.methods) == {"sft", "dft", "idft", "hd_sft", "hd_idft", "dpo", "simpo"}
    assert {m.data for m in cfg.methods.values()} == {"original", "hd", "pairs"}
    assert cfg.corpus.family == "addition" and cfg.eval.family == ["basic_arithmetic"]
    # the held-out in-family task is the corpus's own generator settings (the demo's too)
    from opsft.data.datasets import ADDITION

    held_out = [t for t in cfg.eval.tasks if getattr(t, "name", None) == "basic_arithmetic"]
    assert len(held_out) == 1 and held_out[0].config == ADDITION


def test_reproduce_end_to_end_on_a_tiny_model(tiny_model, tokenizer, tmp_path, capsys, monkeypatch):
    from opsft.engines.hf import HFEngine

    # a random model writes blanks; make every generation a short wrong answer instead, so the
    # self-answers are wrong and non-empty (the rejected side of the pairs); the rest is real
    answer = tokenizer("I think 3.", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, params: [list(answer) for _ in prompts])
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = yaml.safe_load((ROOT / "workflows/reproduce.yaml").read_text())
    config.update(output_dir=str(tmp_path / "out"), model=str(model_dir), threads=1, corpus={"rows": 4, "seed": 0})
    config["rewrite"].update(max_new_tokens=4, hint_max_new_tokens=4, batch_size=4)
    config["eval"].update(tasks=[{**config["eval"]["tasks"][0], "n": 2, "max_new_tokens": 4}, "chain_sum:2:4"],
                          passages=1, tokens_per_passage=16)
    config["train"].update(global_batch_size=2, micro_batch_size=2, max_steps=2)
    for method in config["methods"].values():
        method["lr"] = 1e-3
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    workflow = load_workflow()
    assert workflow.main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["base", "sft", "dft", "idft", "hd_sft", "hd_idft", "dpo", "simpo"]
    assert rows["base"]["text_nll_change"] == 0.0
    data = results["data"]
    # every pair's rejected side is the model's own wrong answer, its chosen side the reference
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert data["pairs"] == len(pairs) and 3 <= len(pairs) <= 4  # 4 unless an answer happens to be 3
    rewrite = [json.loads(line) for line in (out / "rewrite.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rewrite}
    assert all(p["rejected"] == "I think 3." and p["chosen"] == by_id[p["id"]]["original_response"] for p in pairs)
    for name, row in rows.items():
        evaluated = json.loads((out / "eval" / f"{name}.json").read_text())
        assert row["text_nll"] == evaluated["general_text"]["nll"]
        if name != "base":
            assert (out / "runs" / name / "final" / "model.safetensors").exists()
            assert row["text_nll"] != rows["base"]["text_nll"]  # training changed the weights
            assert row["train_corpus_cll_before"] == json.loads((out / "eval/base.json").read_text())[
                "corpus_cll"][row["data"]]
    assert (out / "results.png").stat().st_size > 1000
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 8 and "addition (in)" in table[0]
    # a re-run finds every stage done: no training, the same results
    capsys.readouterr()
    assert workflow.main(["--config", str(path)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"]
    with pytest.raises(SystemExit, match="unknown methods"):
        workflow.main(["--config", str(path), "--only", "sft,ppo"])
