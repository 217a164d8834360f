"""Hinted decoding: the batched, cached decoder against a plain reference loop written as the
official code describes it (one item, no cache, the whole sequence through the model each step).

    .venv/bin/python -m pytest -q tests/test_hinted.py
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opsft.data.chat import TokenText
from opsft.data.hints import OUTPUT_STOPS, HintReading, cut_at_stop, hint_prefix, marker_line, read_hint
from opsft.engines.hf_streams import ModelStreams
from opsft.method.hinted import (
    TextWatch,
    hinted_decode,
    is_repeating,
    item_generator,
    lambda_weight,
    pick_tokens,
    sample_inverse_cdf,
    top_p_then_temperature,
    trim_at_stop,
)
from opsft.method.hinted_params import HDItem, HDParams

# ------------------------------------------------------------------ the reference (official style)


def ref_nucleus_probs(logits, temperature, top_p):
    """The official NucleusProcessor, literally: top-p on softmax(logits), -1e20, softmax(x / T)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative_probs > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    sorted_logits[remove] = -1e20
    logits = torch.gather(sorted_logits, -1, sorted_indices.argsort(-1))
    return F.softmax(logits / temperature, dim=-1)


def ref_draw(probs, generator):
    """Inverse-CDF sampling written out in numpy: one float64 uniform u from the item's generator,
    then the first token whose running total of probability exceeds u x the total."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    cdf = np.cumsum(probs.detach().cpu().double().numpy())
    return int(np.searchsorted(cdf, u * cdf[-1], side="right"))


def ref_lambda(h_norm, params):
    if params.lambda_mode == "linear":
        return torch.clamp(params.beta * h_norm, 0.0, 1.0)
    if params.lambda_mode == "sigmoid":
        return torch.sigmoid(params.beta * (h_norm - params.sigmoid_center))
    h1, h2 = params.piecewise_bounds
    val = torch.clamp((h_norm - h1) / (h2 - h1), 0.0, 1.0)
    return torch.where(h_norm <= h1, torch.zeros_like(h_norm), torch.where(h_norm >= h2, torch.ones_like(h_norm), val))


def ref_repeated(tokens, k, m):
    counts = defaultdict(int)
    for i in range(len(tokens) - k + 1):
        counts[tuple(tokens[i:i + k])] += 1
        if counts[tuple(tokens[i:i + k])] >= m:
            return True
    return False


@torch.no_grad()
def reference_hinted(model, hinted, student, params, eos, decode_token, generator=None):
    """One item, no key/value cache: the official hinted_generate loop, plus the recipe's two rules
    written the plain way: with params.hold_eos, eos ids get -inf while the whole text so far is
    blank; with params.stop_strings, a stop when the whole text so far contains one."""
    target, drafter = list(hinted), list(student)
    log_vocab = math.log(model.config.vocab_size)

    def last_logits(ids):  # the whole sequence every step; only the last position's head output is needed
        return model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()

    def pick(scores):
        if params.hold_eos and not text.strip():
            scores = scores.clone()
            scores[sorted(eos)] = float("-inf")
        if params.temperature == 0:
            return int(torch.argmax(scores))
        return ref_draw(ref_nucleus_probs(scores, params.temperature, params.top_p), generator)

    out, text, student_only, switched_at = [], "", False, None
    tok = pick(last_logits(target))
    out.append(tok)
    target.append(tok)
    drafter.append(tok)
    text += decode_token(tok)
    if tok in eos:
        return out, "eos", switched_at
    if any(s in text for s in params.stop_strings):
        return out, "stop", switched_at
    printed = 0
    while len(out) < params.max_new_tokens:
        if len(out) // params.repeat_every > printed:
            printed = len(out) // params.repeat_every
            if ref_repeated(out, params.repeat_window, params.repeat_times):
                return out, "repeating", switched_at
        if not student_only and params.splitter and params.splitter in text:
            student_only, switched_at = True, len(out)
        if student_only:
            tok = pick(F.log_softmax(last_logits(drafter), dim=-1))
        else:
            log_p = F.log_softmax(last_logits(target), dim=-1)
            log_q = F.log_softmax(last_logits(drafter), dim=-1)
            p = torch.exp(log_p)
            h = -(p * torch.log(p + 1e-20)).sum(-1)
            lam = ref_lambda(h / log_vocab, params)
            tok = pick((1.0 - lam) * log_p + lam * log_q)
        out.append(tok)
        target.append(tok)
        drafter.append(tok)
        text += decode_token(tok)
        if tok in eos:
            return out, "eos", switched_at
        if any(s in text for s in params.stop_strings):
            return out, "stop", switched_at
    return out, "max_length", switched_at


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    """A 2-layer random Llama whose greedy outputs vary with the context (the shared tiny_model, with
    default init, answers "\n" to everything, which would leave the mixture untested)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def one_thread():
    """Tiny-model steps are too small for two threads (and a busy machine makes spinning threads crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chat_items(tokenizer, questions, hint):
    items = []
    for k, q in enumerate(questions):
        student = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        hinted = tokenizer.apply_chat_template(
            [{"role": "system", "content": hint * (k + 1)}, {"role": "user", "content": q}],
            add_generation_prompt=True)
        student = list(student["input_ids"] if hasattr(student, "keys") else student)
        hinted = list(hinted["input_ids"] if hasattr(hinted, "keys") else hinted)
        items.append(HDItem(hinted_prompt=hinted, student_prompt=student))
    return items


QUESTIONS = ["What is 12 + 30?", "Name a colour.",
             "Tom has 3 apples and buys 4 more. How many apples does he have now?"]


def pick_markers(first, tokenizer):
    """From a plain run of 3 items: an eos token that ends item 0 (absent from items 1 and 2) and a
    splitter (a token text of item 2, absent from item 0's text) so that item 2 switches streams."""
    eos = next(t for t in first[0].tokens[3:] if t not in first[1].tokens + first[2].tokens)
    text0 = tokenizer.decode(first[0].tokens)
    splitter = next(tokenizer.decode([t]) for t in first[2].tokens[2:]
                    if tokenizer.decode([t]).strip() and tokenizer.decode([t]) not in text0)
    return {tokenizer.eos_token_id, eos}, splitter


def check_equal(model, tokenizer, items, params, eos):
    text = TokenText(tokenizer)
    got = hinted_decode(ModelStreams(model, tokenizer.pad_token_id or 0), items, params, eos, decode_token=text)
    reasons = []
    for k, item in enumerate(items):
        tokens, reason, switched = reference_hinted(model, item.hinted_prompt, item.student_prompt, params, eos, text)
        assert got[k].tokens == tokens, f"item {k}: batched {got[k].tokens} != reference {tokens}"
        assert got[k].finish_reason == reason
        assert got[k].switched_at == switched
        reasons.append((reason, switched))
    return got, reasons


# ------------------------------------------------------------------ tests: small pieces


def test_lambda_modes_match_official_formulas():
    h = torch.linspace(0, 1, 101)
    for params in (HDParams(beta=3.0), HDParams(beta=7.0, lambda_mode="sigmoid", sigmoid_center=0.4),
                   HDParams(lambda_mode="piecewise", piecewise_bounds=(0.2, 0.6))):
        torch.testing.assert_close(lambda_weight(h, params), ref_lambda(h, params))
    assert lambda_weight(torch.tensor([0.1]), HDParams(beta=3.0)).item() == pytest.approx(0.3)


def test_nucleus_matches_official_processor():
    torch.manual_seed(0)
    scores = torch.randn(5, 300) * 3
    for top_p, temperature in ((0.95, 0.3), (0.5, 1.0), (1.0, 0.7)):
        torch.testing.assert_close(top_p_then_temperature(scores, top_p, temperature),
                                   ref_nucleus_probs(scores.clone(), temperature, top_p))
    # brute force on one row: kept = smallest prefix of the sorted tokens whose mass reaches top_p
    p = F.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0]), -1)  # 0.57, 0.21, 0.13, 0.08
    probs = top_p_then_temperature(p.log(), 0.7, 1.0)
    assert probs[2:].sum() == 0 and probs[:2].sum() == pytest.approx(1.0)


def test_inverse_cdf_draws_have_the_exact_distribution():
    """A uniform grid of N values of u (what a generator draws, spread evenly) lands on each token
    p(v) x N times, up to one grid point (each token owns an interval of u of length p(v))."""
    torch.manual_seed(1)
    probs = top_p_then_temperature(torch.randn(3, 50) * 2, 0.9, 0.5)  # nucleus zeros included
    n = 100_000
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for row in probs:
        picked = sample_inverse_cdf(row.expand(n, -1), grid)
        counts = torch.bincount(picked, minlength=row.numel()).double()
        assert counts[row == 0].sum() == 0  # outside the nucleus: never
        assert (counts - row.double() / row.double().sum() * n).abs().max() <= 1.0 + 1e-9
    # the edges: u = 0 takes the first token with probability; u x total rounded up to the total
    # (u = 1 here) takes the last token with probability, not a zero after it
    row = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    assert sample_inverse_cdf(row.expand(4, -1), torch.tensor([0.0, 0.25, 0.5, 1.0])).tolist() == [1, 3, 3, 3]


def pick_rows(scores, params, seeds, steps):
    """`steps` successive picks on the same scores, each row with its own generator from seeds."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [pick_tokens(scores, params, gens) for _ in range(steps)]


def test_pick_tokens_draws_are_the_rows_own_and_match_inverse_cdf():
    torch.manual_seed(2)
    scores = torch.randn(4, 300) * 2
    params = HDParams(temperature=0.3, top_p=0.95)
    seeds = [11, 12, 13, 14]
    together = pick_rows(scores, params, seeds, 6)
    for r in range(4):  # each row alone, and the rows reversed: the same tokens
        alone = pick_rows(scores[r:r + 1], params, seeds[r:r + 1], 6)
        assert [step[0] for step in alone] == [step[r] for step in together]
    backwards = pick_rows(scores.flip(0), params, seeds[::-1], 6)
    assert [step[::-1] for step in backwards] == together
    # against the official nucleus probabilities and the numpy inverse-CDF draw, seed by seed
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    expected = [[ref_draw(ref_nucleus_probs(scores[r].clone(), 0.3, 0.95), gens[r]) for r in range(4)]
                for _ in range(6)]
    assert together == expected
    assert len({t for step in together for t in step}) > 4  # the draws do vary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pick_tokens_on_cuda_with_cpu_generators():
    torch.manual_seed(3)
    scores = (torch.randn(4, 151936) * 2).cuda()
    params = HDParams(temperature=0.3, top_p=0.95)
    seeds = [21, 22, 23, 24]
    together = pick_rows(scores, params, seeds, 5)
    assert [step[0] for step in pick_rows(scores[2:3], params, seeds[2:3], 5)] == [step[2] for step in together]
    probs = top_p_then_temperature(scores, 0.95, 0.3).cpu()  # the CUDA probabilities, drawn from on the CPU
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    assert together == [[ref_draw(probs[r], gens[r]) for r in range(4)] for _ in range(5)]


def test_repetition_rule():
    cycle = list(range(7))
    assert is_repeating(cycle * 10, 30, 5)        # period 7: each window recurs every 7 tokens
    assert not is_repeating(cycle * 6, 30, 5)     # 42 tokens: a 30-window fits only twice
    assert not is_repeating(list(range(200)), 30, 5)


def test_text_watch_finds_a_string_split_across_tokens():
    pieces = {1: "The answer.\n#", 2: " C", 3: "o", 4: "T:\n", 5: "more"}
    watch = TextWatch(["# CoT"], pieces.__getitem__)
    assert [watch.feed(t) for t in (1, 2, 3, 4, 5)] == [False, False, False, True, True]
    assert trim_at_stop([1, 2, 3, 4, 5, 5], ["# CoT"], pieces.__getitem__) == [1, 2, 3, 4]  # the completing token
    assert trim_at_stop([1, 2, 5], ["# CoT"], pieces.__getitem__) == [1, 2, 5]              # never completed
    assert trim_at_stop([1, 2], [], pieces.__getitem__) == [1, 2]
    assert cut_at_stop("x = 3.\n\n# Question: y?\n# CoT", OUTPUT_STOPS) == "x = 3.\n\n"
    assert cut_at_stop("no header", OUTPUT_STOPS) == "no header"
    with pytest.raises(ValueError, match="decode_token"):
        TextWatch(["# CoT"], None)


# (hint output, its analysis, marker ended it) - the hostile hints: several markers, a question the model
# invented before its marker, a marker with nothing after it or nothing before it, a heading only
HINTS = [
    ("# Analyze\n1 + 2 is 3.\n# CoT:\nThe sum", "# Analyze\n1 + 2 is 3.\n", True),
    ("a\n# CoT\nsome\n# CoT\nmore", "a\n", True),                                  # the first marker is ours
    ("2 + 2 = 4.\n\n# Question:\nWhat is 9 + 9?\n\n# Answer:\n18\n\n# CoT:\n", "2 + 2 = 4.\n\n", False),
    ("a\n# CoT:\nx\n# Question:\nWhat is 15% of 20?\n# CoT:\n", "a\n", True),     # invented after: ignored
    ("13 + 13 = 26.\n\n# Analysis\nThe answer is 26.\n\n# CoT", "13 + 13 = 26.\n\n# Analysis\n"
     "The answer is 26.\n\n", True),                                                 # a marker with nothing after
    ("# CoT\n", "", True),                                                            # nothing before it
    ("# Analyze\n\n# CoT:", "# Analyze\n\n", True),                                 # a heading, no analysis
    ("13 + 13 = 26.", "13 + 13 = 26.", False),                                         # no marker at all
    ("", "", False),
]


@pytest.mark.parametrize(("hint", "analysis", "marker"), HINTS)
def test_read_hint_takes_the_marker_of_the_question_being_rewritten(hint, analysis, marker):
    assert read_hint(hint) == HintReading(analysis=analysis, marker=marker)


@pytest.mark.parametrize(("hint", "analysis", "marker"), HINTS)
def test_hint_prefix_and_its_fallbacks(hint, analysis, marker):
    usable = bool(analysis.replace("# Analysis", "").replace("# Analyze", "").strip())
    for cut in ("line", "marker"):
        line = "# CoT:\n" if cut == "line" else "# CoT"
        assert marker_line(cut) == line
        if marker and usable:  # the analysis, then the marker line; "marker" = the hint exactly up to "# CoT"
            expect = (analysis + line, False)
            assert hint_prefix(hint, cut, "skip") == expect and hint_prefix(hint, cut, "cot") == expect
            if cut == "marker":
                assert hint.startswith(expect[0])
        else:  # no usable analysis ended by the marker: as missing_hint says
            assert hint_prefix(hint, cut, "skip") == (None, False)
            opened = analysis.rstrip() + "\n\n" + line if usable else line
            assert hint_prefix(hint, cut, "cot") == (opened, True)
    with pytest.raises(ValueError, match="hint cut"):
        hint_prefix("a\n# CoT", "after")
    with pytest.raises(ValueError, match="missing_hint"):
        hint_prefix("a\n# CoT", "line", "sometimes")


def test_a_hint_that_ran_out_of_tokens_has_no_usable_analysis():
    looping = "The answer is 5.\n\n" * 8
    assert read_hint(looping, ended=False) == HintReading(analysis=looping, marker=False, ended=False)
    assert not read_hint(looping, ended=False).usable and read_hint(looping).usable
    assert hint_prefix(looping, "line", "cot", ended=False) == ("# CoT:\n", True)       # the marker line alone
    assert hint_prefix(looping, "line", "skip", ended=False) == (None, False)
    assert hint_prefix(looping, "line", "cot") == (looping.rstrip() + "\n\n# CoT:\n", True)
    # stopped at its marker or at a header at the budget's last token: it ended all the same
    assert hint_prefix("a\n# CoT", "line", "cot", ended=False) == ("a\n# CoT:\n", False)
    assert read_hint("a\n# Question", ended=False).usable


# ------------------------------------------------------------------ tests: equivalence


@pytest.mark.parametrize("beta", [0.0, 0.7, 3.0])
def test_greedy_equals_reference_tiny(tiny_lm, tokenizer, beta, one_thread):
    items = chat_items(tokenizer, QUESTIONS, "You know the answer is 42. ")
    plain = HDParams(beta=beta, temperature=0, max_new_tokens=40, splitter=None)
    first, _ = check_equal(tiny_lm, tokenizer, items, plain, {tokenizer.eos_token_id})
    eos, splitter = pick_markers(first, tokenizer)  # now exercise the splitter and eos
    params = HDParams(beta=beta, temperature=0, max_new_tokens=40, splitter=splitter)
    got, reasons = check_equal(tiny_lm, tokenizer, items, params, eos)
    assert got[2].switched_at is not None
    assert reasons[0][0] == "eos" and any(r == "max_length" for r, _ in reasons)


def test_hold_eos_and_stop_strings_equal_reference_tiny(tiny_lm, tokenizer, one_thread):
    """The recipe's rules: an eos that greedy decoding would pick first is held while the output is
    blank, and a stop string ends an item at the token that completes it; both against the
    reference loop, which applies them to the whole text."""
    items = chat_items(tokenizer, QUESTIONS, "You know the answer is 42. ")
    plain = HDParams(beta=3.0, temperature=0, max_new_tokens=30, splitter=None)
    first, _ = check_equal(tiny_lm, tokenizer, items, plain, {tokenizer.eos_token_id})
    opening = {r.tokens[0] for r in first}
    eos = opening | {tokenizer.eos_token_id}    # every item's first token is now an end-of-sequence id
    blank, _ = check_equal(tiny_lm, tokenizer, items, plain, eos)
    assert all(r.tokens == [r0.tokens[0]] and r.finish_reason == "eos" for r, r0 in zip(blank, first, strict=True))
    held = HDParams(beta=3.0, temperature=0, max_new_tokens=30, splitter=None, hold_eos=True)
    got, _ = check_equal(tiny_lm, tokenizer, items, held, eos)
    text = TokenText(tokenizer)
    for r in got:  # no item ends before its text has content
        assert r.tokens[0] not in eos and "".join(text(t) for t in r.tokens[:-1] if t not in eos).strip()
    # a stop string split over two tokens of item 1's plain output; each item must end at the first
    # token whose text, with everything before it, contains it (worked out here on the plain outputs)
    t1 = [text(t) for t in first[1].tokens]
    k = next(i for i in range(1, len(t1) - 1) if t1[i].strip() and t1[i + 1].strip())
    stop = t1[k][-1] + t1[k + 1][0]

    def ends_at(tokens):
        return next((n for n in range(1, len(tokens) + 1) if stop in "".join(text(t) for t in tokens[:n])), None)

    stopped = HDParams(beta=3.0, temperature=0, max_new_tokens=30, splitter=None, stop_strings=(stop,))
    got, _ = check_equal(tiny_lm, tokenizer, items, stopped, {tokenizer.eos_token_id})
    for r, r0 in zip(got, first, strict=True):
        n = ends_at(r0.tokens)
        assert (r.tokens, r.finish_reason) == ((r0.tokens[:n], "stop") if n else (r0.tokens, r0.finish_reason))
    assert got[1].finish_reason == "stop" and len(got[1].tokens) <= k + 2
    with pytest.raises(ValueError, match="decode_token"):
        hinted_decode(ModelStreams(tiny_lm), items, held, eos)


def test_repeating_stop_equals_reference_tiny(tiny_lm, tokenizer, one_thread):
    items = chat_items(tokenizer, QUESTIONS, "Hint. ")
    params = HDParams(beta=0.7, temperature=0, max_new_tokens=250, splitter=None)
    _, reasons = check_equal(tiny_lm, tokenizer, items, params, {tokenizer.eos_token_id})
    assert any(r == "repeating" for r, _ in reasons), reasons


@pytest.fixture(scope="module")
def tiny_lm64(tiny_lm):
    """tiny_lm in float64, for comparing sampled tokens. Its next-token distribution is nearly flat
    over the 49k-token vocabulary, so the top-p cut and the inverse-CDF draw sit among thousands of
    near-equal probabilities: the float32 rounding differences between a batched, cached pass and
    the reference's one-item recompute (~1e-7) move a draw to a neighbouring token on some CPUs
    (seen: same code, one machine passed, another failed at token 9). In float64 those differences
    are ~1e-16, far below any interval of the draw."""
    import copy

    return copy.deepcopy(tiny_lm).double()


def test_sampling_seeded_and_equal_to_reference(tiny_lm64, tokenizer, one_thread):
    tiny_lm = tiny_lm64
    items = chat_items(tokenizer, QUESTIONS, "Hint. ")
    params = HDParams(beta=3.0, temperature=0.8, top_p=0.9, max_new_tokens=20, splitter=None, seed=5)
    text = TokenText(tokenizer)
    a = hinted_decode(ModelStreams(tiny_lm), items, params, {tokenizer.eos_token_id}, decode_token=text)
    b = hinted_decode(ModelStreams(tiny_lm), items, params, {tokenizer.eos_token_id}, decode_token=text)
    c = hinted_decode(ModelStreams(tiny_lm), items, HDParams(**{**params.__dict__, "seed": 6}),
                      {tokenizer.eos_token_id}, decode_token=text)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    # Each item's draw is its own: the reference loop with that item's generator gives the same tokens.
    for k, item in enumerate(items):
        tokens, _, _ = reference_hinted(tiny_lm, item.hinted_prompt, item.student_prompt, params,
                                        {tokenizer.eos_token_id}, text, generator=item_generator(5, k))
        assert a[k].tokens == tokens



def test_an_item_with_its_own_seed_samples_the_same_tokens_in_any_batch(tiny_lm64, tokenizer, one_thread):
    """The recipe seeds each item from its row id, so a resumed job (other batch, other position)
    samples what an uninterrupted one would."""
    tiny_lm = tiny_lm64
    items = [dataclasses.replace(it, seed=100 + k) for k, it in enumerate(chat_items(tokenizer, QUESTIONS, "Hint. "))]
    params = HDParams(beta=3.0, temperature=0.8, top_p=0.9, max_new_tokens=12, splitter=None, seed=5)
    text = TokenText(tokenizer)
    together = hinted_decode(ModelStreams(tiny_lm), items, params, {tokenizer.eos_token_id}, decode_token=text)
    alone = hinted_decode(ModelStreams(tiny_lm), items[-1:], params, {tokenizer.eos_token_id}, decode_token=text)
    reordered = hinted_decode(ModelStreams(tiny_lm), items[::-1], params, {tokenizer.eos_token_id},
                              decode_token=text)
    assert alone[0].tokens == together[-1].tokens == reordered[0].tokens
    assert [r.tokens for r in reordered[::-1]] == [r.tokens for r in together]


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_greedy_equals_reference_real_model(real_engine, beta, one_thread):
    model, tokenizer = real_engine.model, real_engine.tokenizer
    items = chat_items(tokenizer, QUESTIONS, "The teacher says: answer briefly and precisely. ")
    plain = HDParams(beta=beta, temperature=0, max_new_tokens=14, splitter=None)
    first, _ = check_equal(model, tokenizer, items, plain, {tokenizer.eos_token_id})
    eos, splitter = pick_markers(first, tokenizer)
    params = HDParams(beta=beta, temperature=0, max_new_tokens=14, splitter=splitter)
    got, reasons = check_equal(model, tokenizer, items, params, eos)
    assert got[2].switched_at is not None
    assert reasons[0][0] == "eos" and any(r == "max_length" for r, _ in reasons)
