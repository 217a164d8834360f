"""Preference pairs: the builder from `opsft rewrite` rows (one handmade row per case), pair-row
validation, tokenisation for training, and `opsft pairs`."""

from __future__ import annotations

import json

import pytest
from opsft.cli import main as cli_main
from opsft.data.corpus import RowError, write_rows
from opsft.data.pairs import parse_pair, preference_pairs
from opsft.data.reader import read_rows
from opsft.train.batches import IGNORE
from opsft.train.pairs import collate_pairs, prepare_pairs


def rewritten(id_, verified, self_verified, response="hd text", self_response="wrong 3", **kw):
    """A row as opsft.recipe.rewrite_rows (self-first) writes it."""
    source = "self" if self_verified else ("hd" if verified else "original")
    return {"id": id_, "prompt": f"Question {id_}?", "answer": "4", "response": response,
            "original_response": "reference solution: 4", "source": source, "verified": verified,
            "self_response": self_response, "self_verified": self_verified, **kw}


ROWS = [
    rewritten("hd", True, False),                                  # pair: chosen = verified HD rewrite
    rewritten("orig", False, False, response="reference solution: 4"),  # pair: chosen = the reference
    rewritten("dropped", False, False, response="reference solution: 4", dropped=True),  # still a pair
    rewritten("unchecked", None, False, response="hd, unverifiable"),   # HD not verified: the reference
    rewritten("self", True, True, response="wrong 3", self_response="right 4"),  # model right: skipped
    rewritten("nojudge", None, None),                              # no verdict on the self answer
    rewritten("hdall", True, None, self_response=None),            # policy hd-all: no self answer
    rewritten("empty", False, False, self_response="  "),
    rewritten("nochosen", False, False, original_response=""),
    rewritten("same", False, False, self_response="reference solution: 4"),
    {"id": "bad", "prompt": "x", "error": "'response' is empty"},
    {"id": "msgs", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "response": "4", "original_response": "2+2 = 4", "verified": True, "source": "hd",
     "self_response": "5", "self_verified": False},
]


def test_builder_makes_a_pair_only_from_a_wrong_self_answer():
    pairs, counts = preference_pairs(ROWS)
    assert [p["id"] for p in pairs] == ["hd", "orig", "dropped", "unchecked", "msgs"]
    by_id = {p["id"]: p for p in pairs}
    assert by_id["hd"] == {"id": "hd", "prompt": "Question hd?", "answer": "4", "chosen": "hd text",
                           "rejected": "wrong 3", "chosen_source": "hd"}
    assert by_id["orig"]["chosen"] == "reference solution: 4" and by_id["orig"]["chosen_source"] == "original"
    assert by_id["unchecked"]["chosen"] == "reference solution: 4"  # verified None: not trusted
    assert by_id["msgs"]["messages"][0]["role"] == "system" and by_id["msgs"]["chosen"] == "4"
    assert counts == {"rows": 12, "pairs": 5, "error": 1, "bad_answer": 0, "self_correct": 1, "self_unjudged": 2,
                      "empty_self_response": 1, "no_chosen": 1, "same_text": 1, "too_long": 0}
    for p in pairs:
        parse_pair(p)  # every pair is a valid pair row


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "a "}, "same text"),
    ({"chosen": "a", "rejected": "b"}, "neither 'prompt' nor 'messages'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "must be a string"),
])
def test_bad_pair_rows(row, message):
    with pytest.raises(RowError, match=message):
        parse_pair(row)


def test_prepare_pairs_tokenises_both_sides_on_the_same_prompt(tokenizer):
    rows = [{"prompt": "2+2?", "chosen": "It is 4.", "rejected": "It is 5, I think."},
            {"prompt": "x", "chosen": "same", "rejected": "same"},
            {"prompt": "Long?", "chosen": "ok", "rejected": "word " * 100}]
    pairs, stats = prepare_pairs(rows, tokenizer, max_length=64)
    assert (stats.rows, stats.used, stats.error_rows, stats.too_long_skipped) == (3, 1, 1, 1)
    [p] = pairs
    start = p.chosen.response_start
    assert p.rejected.response_start == start and p.chosen.input_ids[:start] == p.rejected.input_ids[:start]
    assert p.chosen.has_eos and p.rejected.has_eos and len(p) == len(p.rejected)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["n_pairs"] == 1 and batch["input_ids"].shape[0] == 2 and "ref_logps" not in batch
    assert int((batch["labels"][1] != IGNORE).sum()) == len(p.rejected) - start
    truncated, stats = prepare_pairs(rows, tokenizer, max_length=64, overlong="truncate")
    assert stats.truncated == 1 and len(truncated[1].rejected) == 64 and not truncated[1].rejected.has_eos
    # a rewrite output is made into pairs on the way (the builder's counts are kept)
    from_rewrite, stats = prepare_pairs(ROWS, tokenizer, max_length=256)
    assert len(from_rewrite) == 5 and stats.from_rewrite["self_correct"] == 1
    empty = collate_pairs([], tokenizer.pad_token_id)
    assert empty["n_pairs"] == 0 and bool((empty["labels"] == IGNORE).all())


def test_cli_pairs_accounts_for_every_row(tmp_path, capsys):
    hostile = [rewritten("obj", False, False, answer={"value": 4}),          # an answer no verifier can compare
               rewritten("num", False, False, answer=4),                     # a number is an answer
               rewritten("huge", False, False, original_response="word " * 20000),  # longer than the model takes
               {"id": "no-prompt", "response": "x", "self_verified": False, "self_response": "y"}]
    write_rows(ROWS + hostile, tmp_path / "rw.jsonl")
    assert cli_main(["pairs", "--input", str(tmp_path / "rw.jsonl"), "--output", str(tmp_path / "p.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    out = read_rows(tmp_path / "p.parquet")
    assert [r["id"] for r in out] == [r["id"] for r in ROWS + hostile]  # rows out == rows in, in order
    assert summary["rows"] == 16 and summary["pairs"] == 6 and summary["max_length"] == 8192
    assert (summary["bad_answer"], summary["too_long"], summary["no_chosen"]) == (1, 1, 2)
    by_id = {r["id"]: r for r in out}
    assert by_id["obj"]["no_pair"] == "bad_answer" and by_id["obj"]["error"].startswith("no pair:")
    assert by_id["num"]["chosen"] == "reference solution: 4" and by_id["num"]["no_pair"] is None
    assert by_id["huge"]["no_pair"] == "too_long"
    assert by_id["bad"]["error"] == "no pair: 'response' is empty"
    assert by_id["no-prompt"]["no_pair"] == "no_chosen"
    pairs = [r for r in out if r["no_pair"] is None]
    for p in pairs:
        parse_pair(p)  # every pair is a valid pair row; the others are error rows training counts and skips
    _, stats = prepare_pairs(out, tokenizer_of(), max_length=512)
    assert stats.used == 6 and stats.error_rows == 10
    # the same file as JSONL; a tighter --max-length makes more rows too long
    assert cli_main(["pairs", "--input", str(tmp_path / "rw.jsonl"), "--output", str(tmp_path / "p.jsonl"),
                     "--max-length", "20"]) == 0
    tight = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (tight["too_long"], tight["pairs"]) == (7, 0)  # the 6 pairs and the huge one
    assert tight["rows"] == 16 == len(read_rows(tmp_path / "p.jsonl"))
    write_rows([{"prompt": "q", "response": "a"}], tmp_path / "plain.jsonl")
    assert cli_main(["pairs", "--input", str(tmp_path / "plain.jsonl"), "--output", str(tmp_path / "x.jsonl")]) == 2


def tokenizer_of():
    from opsft.models import default_model_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir())
