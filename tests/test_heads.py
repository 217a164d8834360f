"""LM heads that are not plain (opsft.models.HEAD_FAMILIES): one tiny random model per family, built
from its transformers config (no hub), against the model's own logits.

- scale families (logits = s * (h @ W.T), s from a config field): the head path opsft uses (the
  decoder's last hidden state through plain_lm_head(model).fold(), and through load_lm_head's head
  read from a saved checkpoint) reproduces model(...).logits, float64, to rounding; and the raw head
  does not (the family really scales by s);
- non-linear families (soft-capping): the logits are cap * tanh(raw / cap) indeed, plain_lm_head is
  None and head_spec / load_lm_head (the exact vllm scorer) raise with the family and field named;
- structural refusals (prediction-head transforms, ...): refused from the config;
- a plain family (llama, qwen2): scale 1.0, the same logits; a listed field in a family that does
  not list it is refused; every causal-LM model type of the installed transformers that
  HEAD_FAMILIES does not list has a plain head by its default config;
- the hf engine: a scaled family is scored through the fused head, equal to a brute-force
  log_softmax of the model's logits; a model whose forward transforms its logits behind opsft's back
  is caught by the engine's probe (warned once), and then scored from its own logits.
- training: a scaled head's fused loss equals the logits path's in value and gradient.

A family whose tiny model cannot be built in the installed transformers is skipped with the reason.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from opsft.models import (
    HEAD_FAMILIES,
    HeadSpec,
    UnsupportedHead,
    head_mismatch,
    head_scale,
    head_spec,
    head_tolerance,
    head_transform,
    plain_lm_head,
)

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, shared_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
            max_position_embeddings=64, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, n_routed_experts=4, n_shared_experts=1,
            swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
            mamba_d_ssm=64, mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8)
TOL64 = 1e-10  # float64 rounding, relative to the largest |logit| (the logits are O(1))
ROPE_3D = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}

# model type -> (config fields that make it tiny and set its head transform, the expected logit scale)
SCALED = {
    "cohere": (dict(logit_scale=0.25), 0.25),
    "cohere2": (dict(logit_scale=3.0), 3.0),
    "cohere2_moe": (dict(logit_scale=0.25), 0.25),
    "cohere_compass_text": (dict(logit_scale=3.0, rope_parameters={"full_attention": ROPE_3D,
                                                                    "sliding_attention": ROPE_3D}), 3.0),
    "granite": (dict(logits_scaling=4.0), 0.25),
    "granite_swa": (dict(logits_scaling=0.25), 4.0),
    "granitemoe": (dict(logits_scaling=4.0), 0.25),
    "granitemoe_swa": (dict(logits_scaling=4.0), 0.25),
    "granitemoeshared": (dict(logits_scaling=4.0), 0.25),
    "granitemoehybrid": (dict(logits_scaling=4.0, layer_types=["mamba", "attention"]), 0.25),
    "hyperclovax": (dict(logits_scaling=3.0), 3.0),
    "falcon_h1": (dict(lm_head_multiplier=0.25), 0.25),
    "minicpm3": (dict(dim_model_base=8, num_key_value_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      kv_lora_rank=16, q_lora_rank=16), 0.25),  # logits_scaling = hidden 32 / dim_model_base 8
    "inkling_text": (dict(logits_mup_width_multiplier=4.0), 0.25),
}
CAP = 2.0  # small enough that tanh bends the tiny models' logits (|raw| up to ~2)
SOFTCAPPED = {
    "gemma2": dict(final_logit_softcapping=CAP),
    "gemma3_text": dict(final_logit_softcapping=CAP),
    "gemma3n_text": dict(final_logit_softcapping=CAP, layer_types=["sliding_attention", "full_attention"],
                         activation_sparsity_pattern=[0.0, 0.0], num_kv_shared_layers=0,
                         vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, laurel_rank=4),
    "gemma4_text": dict(final_logit_softcapping=CAP, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8),
    "gemma4_unified_text": dict(final_logit_softcapping=CAP),
    "vaultgemma": dict(final_logit_softcapping=CAP),
    "nanochat": dict(final_logit_softcapping=CAP),
    "recurrent_gemma": dict(logits_soft_cap=CAP),
    "xlstm": dict(output_logit_soft_cap=CAP, hidden_size=64, embedding_dim=64, num_heads=4, num_blocks=1, chunk_size=8,
                  qk_dim_factor=1.0),
}
STRUCTURE = sorted({t for f in HEAD_FAMILIES if f.op == "structure" for t in f.model_types})
SCALE_FIELD = {t: f.field for f in HEAD_FAMILIES if f.op in ("multiply", "divide", "divide_hidden")
               for t in f.model_types}
CAP_FIELD = {t: f.field for f in HEAD_FAMILIES if f.op == "softcap" for t in f.model_types}


def tiny_config(model_type: str, **fields):
    from transformers import AutoConfig

    try:
        base = AutoConfig.for_model(model_type).to_dict()
    except (KeyError, ValueError) as exc:
        pytest.skip(f"{model_type} is not in the installed transformers: {exc}")
    sizes = {k: v for k, v in TINY.items() if k in base}
    try:
        return AutoConfig.for_model(model_type, **{**sizes, **fields})
    except Exception as exc:  # noqa: BLE001 - a family whose tiny config this transformers refuses
        pytest.skip(f"no tiny {model_type} config in the installed transformers: {type(exc).__name__}: {exc}")


def tiny_model(config, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    try:  # eager experts: MoE layers' grouped matmul has no float64 kernel
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no tiny {config.model_type} model in the installed transformers: {type(exc).__name__}: {exc}")
    return model.to(dtype).eval()


def own_and_head_logits(model, length: int = 8):
    """(the model's own logits, the decoder's last hidden state, the raw head's logits) for one probe row."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[(3 + 37 * i) % min(vocab, 100) for i in range(length)]])
    head = model.get_output_embeddings()
    with torch.no_grad():
        try:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"the tiny {model.config.model_type} model does not run here: {type(exc).__name__}: {exc}")
        hidden = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        raw = torch.nn.functional.linear(hidden, head.weight, head.bias)
    return logits, hidden, raw


def assert_close_to_logits(got, logits, tol):
    size = float(logits.abs().max())
    assert got.shape == logits.shape
    assert float((got - logits).abs().max()) <= tol * size, (float((got - logits).abs().max()), size)


# ---------------------------------------------------------------------------- scale families


@pytest.mark.parametrize("model_type", sorted(SCALED))
def test_a_scaled_head_reproduces_the_model_logits(model_type, tmp_path):
    fields, scale = SCALED[model_type]
    model = tiny_model(tiny_config(model_type, **fields))
    logits, hidden, raw = own_and_head_logits(model)
    # the family really scales its logits (the table's direction: multiply or divide)
    assert not torch.allclose(raw, logits, rtol=1e-3, atol=1e-3)
    assert head_scale(model.config) == pytest.approx(scale, rel=1e-12)
    assert head_transform(model.config) == head_spec(model.config).transform and SCALE_FIELD[model_type] in \
        head_spec(model.config).transform
    head = plain_lm_head(model)
    assert head is not None and head.spec.weight_scale == pytest.approx(scale, rel=1e-12)
    weight, bias = head.fold()  # float32 (the scorers' head), the float64 weights rounded once
    assert weight.dtype == torch.float32
    assert_close_to_logits(torch.nn.functional.linear(hidden.float(), weight, bias).double(), logits,
                           head_tolerance(torch.float32))
    exact = HeadSpec(model_type, head.spec.scale, head.spec.hidden_scale, head.spec.vocab)  # the fold in float64
    w64 = exact.rows(model.get_output_embeddings().weight.detach()) * exact.weight_scale
    assert_close_to_logits(hidden @ w64.T, logits, TOL64)
    # the exact vllm scorer's head, read from the saved checkpoint, on the hidden states vLLM's pooling
    # runner returns (which carry a hidden-side scale where vLLM's forward applies it: MiniCPM)
    from opsft.models import load_lm_head

    model.save_pretrained(tmp_path)
    weight, bias = load_lm_head(str(tmp_path))
    pooled = hidden * head.spec.vllm_hidden_scale
    assert_close_to_logits(torch.nn.functional.linear(pooled.float(), weight, bias).double(), logits,
                           head_tolerance(torch.float32))
    if model_type == "minicpm3":  # vLLM's MiniCPMForCausalLM.forward divides by scale_width: the raw head
        assert head.spec.vllm_hidden_scale == scale
        assert torch.equal(weight, model.get_output_embeddings().weight.detach().float())


def test_an_unpadded_vocabulary_keeps_the_head_rows_the_logits_have(tmp_path):
    """inkling: logits = lm_head(h / logits_mup_width_multiplier)[..., :unpadded_vocab_size]."""
    model = tiny_model(tiny_config("inkling_text", logits_mup_width_multiplier=4.0, unpadded_vocab_size=100))
    logits, hidden, _ = own_and_head_logits(model)
    assert logits.shape[-1] == 100 and model.get_output_embeddings().weight.shape[0] == 128
    head = plain_lm_head(model)
    assert head.spec.vocab == 100 and head.spec.weight_scale == 0.25
    weight, bias = head.fold()
    assert weight.shape[0] == 100
    assert_close_to_logits(torch.nn.functional.linear(hidden.float(), weight, bias).double(), logits,
                           head_tolerance(torch.float32))
    from opsft.models import load_lm_head

    model.save_pretrained(tmp_path)
    weight, _ = load_lm_head(str(tmp_path))
    assert weight.shape[0] == 100
    assert_close_to_logits((hidden.float() @ weight.T).double(), logits, head_tolerance(torch.float32))


# ---------------------------------------------------------------------------- non-linear and structural heads


@pytest.mark.parametrize("model_type", sorted(SOFTCAPPED))
def test_a_softcapped_head_is_refused(model_type, tmp_path):
    config = tiny_config(model_type, **SOFTCAPPED[model_type])
    model = tiny_model(config)
    logits, _, raw = own_and_head_logits(model)
    assert_close_to_logits(CAP * torch.tanh(raw / CAP), logits, 1e-6)  # the family caps, as the table says
    assert float((raw - logits).abs().max()) > 1e-3  # and it shows: a plain head would be wrong
    assert plain_lm_head(model) is None
    field = CAP_FIELD[model_type]
    with pytest.raises(UnsupportedHead, match=rf"^{model_type}: .*\({field}={CAP}\).*use the hf engine"):
        head_spec(config)
    with pytest.raises(ValueError, match=rf"{model_type}: .*{field}={CAP}"):
        head_scale(config)
    assert head_transform(config) == f"{field}={CAP}"
    config.save_pretrained(tmp_path)  # the exact vllm scorer refuses it from the config, before any weight
    from opsft.models import load_lm_head

    with pytest.raises(ValueError, match=rf"{tmp_path}: {model_type}: .*{field}={CAP}.*use the hf engine") as info:
        load_lm_head(str(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model_type", STRUCTURE)
def test_a_structurally_different_head_is_refused_from_the_config(model_type):
    config = tiny_config(model_type)
    with pytest.raises(UnsupportedHead, match=rf"^{model_type}: .*use the hf engine"):
        head_spec(config)
    assert head_transform(config) == model_type


@pytest.mark.parametrize("model_type", ["bert", "roberta", "modernbert-decoder"])
def test_a_prediction_head_transform_is_not_taken_for_a_plain_head(model_type):
    model = tiny_model(tiny_config(model_type, is_decoder=True))
    assert plain_lm_head(model) is None
    decoder = getattr(model, "model", None) or model.get_decoder()  # modernbert-decoder's get_decoder() is a Linear
    ids = torch.tensor([[5, 9, 17, 33, 4]])
    with torch.no_grad():
        hidden = decoder(input_ids=ids).last_hidden_state
        raw = model.get_output_embeddings()(hidden)
        logits = model(input_ids=ids).logits
    assert float((raw - logits).abs().max()) > 1e-3  # what the fused path would have got wrong


# ---------------------------------------------------------------------------- plain heads and unlisted families


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_plain_head_has_scale_one_and_the_model_logits(model_type):
    model = tiny_model(tiny_config(model_type))
    logits, hidden, raw = own_and_head_logits(model)
    assert head_scale(model.config) == 1.0 and head_transform(model.config) is None
    head = plain_lm_head(model)
    assert head is not None and head.spec.plain and head.linear is model.get_output_embeddings()
    assert_close_to_logits(raw, logits, TOL64)
    weight, _ = head.fold()
    assert_close_to_logits((hidden.float() @ weight.T).double(), logits, head_tolerance(torch.float32))
    model32 = tiny_model(tiny_config(model_type), torch.float32)
    weight, _ = plain_lm_head(model32).fold()
    assert weight.data_ptr() == model32.get_output_embeddings().weight.data_ptr()  # no copy of a float32 head


def test_a_listed_field_in_a_family_that_does_not_list_it_is_refused():
    config = tiny_config("llama", logit_scale=2.0)
    with pytest.raises(UnsupportedHead, match=r"^llama: .*\(logit_scale=2\.0\).*use the hf engine"):
        head_spec(config)
    assert plain_lm_head(tiny_model(config)) is None  # the hf engine and training then use the model's logits
    assert head_spec(tiny_config("llama", logit_scale=1.0)).plain


def test_a_non_positive_scale_is_refused():
    with pytest.raises(UnsupportedHead, match=r"granite: .*not a positive finite.*logits_scaling=0\.0"):
        head_spec(tiny_config("granite", logits_scaling=0.0))
    with pytest.raises(UnsupportedHead, match=r"cohere: .*logit_scale=-1\.0"):
        head_spec(tiny_config("cohere", logit_scale=-1.0))


def test_every_unlisted_causal_lm_family_has_a_plain_head_by_default():
    """The table against the installed transformers: no family that HEAD_FAMILIES does not list is
    refused by its default config (a new family that sets a logit field shows up here: read its
    forward and list it)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    listed = {t for f in HEAD_FAMILIES for t in f.model_types}
    refused = {}
    for model_type in sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - listed):
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - configs that need sub-configs (musicgen): nothing to check
            continue
        try:
            head_spec(config)
        except UnsupportedHead as exc:
            refused[model_type] = str(exc)
    assert refused == {}


# ---------------------------------------------------------------------------- the hf engine


def brute_force(model, seq, start, temperature):
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, start - 1: -1].double()
    logp = torch.log_softmax(logits / temperature, -1)
    labels = torch.tensor(seq[start:])
    return logp.gather(-1, labels[:, None])[:, 0].numpy(), (-(logp.exp() * logp).sum(-1)).numpy()


def hf_engine(model):
    from opsft.engines.hf import HFEngine

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, model_max_length=64)
    return HFEngine(model_and_tokenizer=(model, tokenizer), device="cpu", max_batch_size=2, chunk_size=5)


SEQS, STARTS = [[(7 * i + 3) % 128 for i in range(12)], [(11 * i + 5) % 128 for i in range(20)]], [4, 9]


def test_the_hf_engine_scores_a_scaled_family_through_the_fused_head():
    model = tiny_model(tiny_config("granite", logits_scaling=4.0), torch.float32)
    engine = hf_engine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe agrees: no warning
        scores = engine.score_tokens(SEQS, STARTS, temperature=0.8)
    assert engine._plain_head() is not None  # the fused head, the scale folded in
    for seq, start, got in zip(SEQS, STARTS, scores, strict=True):
        logp, ent = brute_force(model, seq, start, 0.8)
        assert got.logprob == pytest.approx(logp, abs=2e-5)
        assert got.entropy == pytest.approx(ent, abs=2e-5)


def test_the_hf_engine_catches_logits_transformed_behind_its_back():
    """A family nobody listed: the model's forward soft-caps (and shifts) its logits while its config
    says nothing. The engine's probe sees the head path disagree, warns once, and scores from the
    model's own logits: equal to a brute-force log_softmax of them."""
    model = tiny_model(tiny_config("llama"), torch.float32)
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = 0.5 * torch.tanh(out.logits / 0.5) + torch.linspace(0, 1, out.logits.shape[-1])
        return out

    model.forward = forward
    assert plain_lm_head(model) is not None  # nothing in the config tells
    assert "differ" in head_mismatch(model, plain_lm_head(model))
    engine = hf_engine(model)
    with pytest.warns(RuntimeWarning, match="differ from its LM head.*own logits instead"):
        scores = engine.score_tokens(SEQS, STARTS, temperature=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        again = engine.score_tokens(SEQS, STARTS, temperature=1.0)
    assert engine._plain_head() is None
    for seq, start, got, got2 in zip(SEQS, STARTS, scores, again, strict=True):
        logp, ent = brute_force(model, seq, start, 1.0)
        assert got.logprob == pytest.approx(logp, abs=2e-5) and got2.logprob == pytest.approx(logp, abs=2e-5)
        assert got.entropy == pytest.approx(ent, abs=2e-5)


def test_the_probe_tolerance_follows_the_dtype():
    assert head_tolerance(torch.float32) == pytest.approx(1e-4)
    assert head_tolerance(torch.float32, torch.bfloat16) == pytest.approx(4 * 2.0 ** -7)
    assert head_tolerance(torch.float16) == pytest.approx(4 * 2.0 ** -10)
    model = tiny_model(tiny_config("llama"), torch.bfloat16)  # bf16 logits vs the float32 head path: agree
    assert head_mismatch(model, plain_lm_head(model)) is None


# ---------------------------------------------------------------------------- training


def test_fused_training_with_a_scaled_head_equals_the_logits_path():
    """LossHead applies a family's logit scale as a temperature (T / s): the fused loss's log p, H and
    every parameter's gradient equal the model-logits path's, float64."""
    from opsft.train.step import response_scores

    batch = {"input_ids": torch.tensor([SEQS[1], SEQS[1][::-1]]), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    labels = batch["input_ids"].clone()
    labels[:, :9] = -100
    batch["labels"] = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    off = torch.autocast("cpu", enabled=False)
    results = []
    for fused in (True, False):
        model = tiny_model(tiny_config("granite", logits_scaling=4.0, tie_word_embeddings=False))
        scores = response_scores(model, batch, off, temperature=0.7, fused=fused)
        valid = scores.labels != -100
        loss = -(scores.logp[valid].sum()) + scores.entropy[valid].sum() * 0.0
        loss.backward()
        results.append((scores.logp[valid].detach(), scores.entropy[valid].detach(),
                        {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (lp_f, h_f, g_f), (lp_p, h_p, g_p) = results
    torch.testing.assert_close(lp_f, lp_p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_f, h_p, rtol=1e-10, atol=1e-10)
    assert g_f.keys() == g_p.keys() and "lm_head.weight" in g_f
    for k in g_p:
        torch.testing.assert_close(g_f[k], g_p[k], rtol=1e-9, atol=1e-9 * (float(g_p[k].abs().max()) or 1.0))


def test_a_checkpoint_config_with_a_scale_is_read_by_load_lm_head(tmp_path):
    """The config alone decides (tests/test_vllm_engine.py's refusal, for a scale): a granite
    checkpoint's head comes back scaled by 1 / logits_scaling."""
    model = tiny_model(tiny_config("granite", logits_scaling=8.0, tie_word_embeddings=False), torch.float32)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["logits_scaling"] == 8.0
    from opsft.models import load_lm_head

    weight, bias = load_lm_head(str(tmp_path))
    assert bias is None
    assert torch.equal(weight, model.get_output_embeddings().weight.detach() * 0.125)  # a power of 2: exact
    # scaled in place, but on a copy: the checkpoint keeps its head, and a second read gives the same
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "model.safetensors")["lm_head.weight"],
                       model.get_output_embeddings().weight.detach())
    assert torch.equal(load_lm_head(str(tmp_path))[0], weight)
