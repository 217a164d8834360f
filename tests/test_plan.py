"""opsft plan: per-GPU memory of each stage from a model's config.json, against figures computed by
hand here (published parameter counts, bytes written out), on three real shapes: Qwen2.5-1.5B
(tied embeddings), Qwen2.5-7B (vocab 152k) and Llama-3.1-8B (128k context). The configs under
tests/data/models are the models' public config.json files (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opsft import plan
from opsft.cli import main
from opsft.config import ConfigError, RealignConfig, ScoreConfig, ServeConfig, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "data" / "models"
Q15, Q7, L8 = (str(MODELS / n) for n in ("qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct", "llama-3.1-8b-instruct"))
GIB = 1 << 30
H100 = 80 * GIB


def test_parameter_counts_are_the_published_ones():
    # the models' own cards / safetensors metadata: 1,543,714,304 / 7,615,616,512 / 8,030,261,248
    assert plan.read_shape(Q15).params == 1_543_714_304
    assert plan.read_shape(Q7).params == 7_615_616_512
    assert plan.read_shape(L8).params == 8_030_261_248
    # Mixtral-8x7B (8 experts of 3 x 4096 x 14336, a router, untied 32k vocab): 46,702,792,704
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
               "tie_word_embeddings": False}
    assert plan.shape_from_config(mixtral).params == 46_702_792_704


def test_kv_cache_bytes_per_token():
    # 2 (k, v) x layers x kv heads x head dim x 2 bytes (bf16)
    assert plan.read_shape(Q15).kv_bytes_per_token(2) == 2 * 28 * 2 * 128 * 2 == 28_672
    assert plan.read_shape(Q7).kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert plan.read_shape(L8).kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert plan.read_shape(L8).kv_bytes_per_token(2, tp=2) == 65_536


def test_vllm_scorer_7b_by_hand():
    cfg = ScoreConfig(engine={"kind": "vllm", "max_model_len": 8192}, pool={"num_gpus": 1})
    (stage,) = plan.plan_config(cfg, plan.read_shape(Q7), H100)
    items = stage.items
    assert stage.gpu and stage.runs.startswith("vllm score runner (bf16")  # bf16 is the vLLM default
    assert items["score: weights"] == 7_615_616_512 * 2 == 15_231_233_024
    # one runner (the stage only scores) gets all of gpu_memory_utilization: 0.85 x 80 GiB = 73,014,444,032 B;
    # activations 8,192 tokens x (2 x 18,944 + 4 x 3,584) x 2 B = 855,638,016; CUDA graphs 0.5 GiB
    assert items["score: activations"] == 855_638_016
    assert items["score: kv cache"] == pytest.approx(73_014_444_032 - 15_231_233_024 - 855_638_016 - 536_870_912)
    assert items["fp32 head"] == 152_064 * 3_584 * 4 == 2_179_989_504
    assert items["head chunk"] == 2 * 1024 * 152_064 * 4
    assert stage.fits and stage.headroom == pytest.approx(H100 - stage.need)


def test_8b_at_its_full_128k_context_does_not_fit_the_old_shares():
    shape = plan.read_shape(L8)
    # the default bounds the context: 16,384 tokens of kv cache = 2 GiB, one sequence fits
    (ok,) = plan.plan_config(ScoreConfig(engine={"kind": "vllm"}, pool={"num_gpus": 1}), shape, H100)
    assert ok.fits and plan.max_len(ScoreConfig(engine={"kind": "vllm"}).engine, shape) == 16_384
    # max_model_len 131,072 in the share the score runner had before (0.85 x 0.4 = 0.34 of 80 GiB):
    # 29,205,777,612.8 B - weights 16,060,522,496 - activations 131,072 x 45,056 x 2 = 11,811,160,064
    # - graphs 536,870,912 = 797,224,140.8 B of kv cache, and one 128k sequence needs 131,072 x 131,072 = 16 GiB
    cfg = ScoreConfig(engine={"kind": "vllm", "max_model_len": 131_072, "runners": ("score", "generate")},
                      pool={"num_gpus": 1})
    (bad,) = plan.plan_config(cfg, shape, H100)
    assert not bad.fits
    assert bad.items["score: kv cache"] == pytest.approx(0.34 * H100 - 16_060_522_496 - 11_811_160_064 - 536_870_912)
    short = {c[0].split()[0]: c for c in bad.checks if c[1] > c[2]}
    assert set(short) == {"score", "generate"}  # the generate runner's 0.51 cannot hold 128k tokens either
    what, need, have = short["score"]
    assert need == 16 * GIB and "max_model_len 131072" in what
    line = plan.misfit_line(bad)
    assert "score does not fit" in line and "max_model_len" in line and "gpu_memory_utilization" in line


def test_training_7b_fsdp_over_64_gpus_and_ddp_refused_by_hand():
    shape = plan.read_shape(Q7)
    cfg = TrainConfig(scaling={"num_workers": 64, "use_gpu": True}, max_length=8192, gradient_checkpointing=True)
    fsdp = plan.plan_train(cfg, shape, H100, "fsdp")
    assert fsdp.items["weights + grads + adam (sharded)"] == 16 * 7_615_616_512 / 64 == 1_903_904_128
    assert fsdp.fits
    ddp = plan.plan_train(cfg, shape, H100, "ddp")
    assert ddp.items["weights + grads + adam"] == 121_849_864_192 > H100  # 113.5 GiB: DDP cannot hold a 7B
    assert not ddp.fits and "scaling.strategy: fsdp (or auto)" in ddp.fixes
    assert plan.choose_strategy(cfg, shape, H100) == "fsdp"


def test_training_1_5b_tied_keeps_ddp_by_hand():
    shape = plan.read_shape(Q15)
    assert shape.tied and shape.root_params == 151_936 * 1_536 + 1_536  # one embedding matrix, the final norm
    cfg = TrainConfig(scaling={"num_workers": 8, "use_gpu": True}, max_length=4096, gradient_checkpointing=True)
    stage = plan.plan_train(cfg, shape, H100, "ddp")
    # state 16 P; autocast's bf16 copies 2 P; checkpointed activations: 4 x 4,096 tokens x (28 x 2 x 1,536
    # + 2 x (8 x 1,536 + 2 x 256 + 4 x 8,960) + 8 x 1,536) = 16,384 x 195,584; the fused head: two
    # [1,024 x V] float32 chunks + the float32 head and its gradient
    assert stage.items == {
        "weights + grads + adam": 24_699_428_864, "bf16 weight copies (autocast)": 3_087_428_608,
        "activations": 3_204_448_256, "loss head": 1_244_659_712 + 1_866_989_568, "cuda context": GIB}
    assert stage.fits and plan.choose_strategy(cfg, shape, H100) == "ddp"
    # without checkpointing at the model's 32k context the activations alone are 4 x 32,768 x 28 x 109,568 B
    long = plan.plan_train(TrainConfig(scaling={"num_workers": 8, "use_gpu": True}), shape, H100, "ddp")
    assert long.items["activations"] == 4 * 32_768 * 28 * 109_568 and not long.fits
    assert "gradient_checkpointing: true" in long.fixes


def test_shipped_configs_fit_the_7b_on_h100s_and_the_old_ones_do_not(capsys):
    for path in ("deploy/realign_config.yaml", "workflows/realign.yaml", "deploy/serve_config.yaml",
                 "deploy/rayservice.yaml"):
        assert main(["plan", "--config", str(ROOT / path), "--model", Q7, "--gpu-memory", "80"]) == 0, path
    out = capsys.readouterr().out
    assert "train fsdp x64: fits" in out and "DOES NOT FIT" not in out
    # the settings shipped before (an fp32 hf engine, DDP on 8 GPUs, the model's whole context)
    rc = main(["plan", "--config", str(ROOT / "tests/data/plan/realign_config_0.1.yaml"), "--model", Q7,
               "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "train does not fit" in out and "scaling.strategy: fsdp" in out and "over by 872.887 GiB" in out
    # its hf engines fit, in float32 (28.4 GiB of weights a GPU)
    assert "score: hf engine (fp32): fits" in out


def test_plan_json_has_every_figure(capsys):
    assert main(["plan", "--config", str(ROOT / "deploy/realign_config.yaml"), "--model", Q7, "--gpu-memory", "80",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["params"] == 7_615_616_512 and report["gpu_gib"] == 80
    stages = {s["stage"]: s for s in report["stages"]}
    assert set(stages) == {"score", "rewrite/self-answer", "rewrite/hint", "rewrite/hinted-decoding",
                           "rewrite/score", "train"}
    for s in stages.values():
        assert s["need_gib"] + s["headroom_gib"] == pytest.approx(s["budget_gib"], abs=2e-3)
    assert stages["train"]["items_gib"]["weights + grads + adam (sharded)"] == pytest.approx(1_903_904_128 / GIB,
                                                                                             abs=1e-3)


def test_reload_counts_two_engines():
    shape = plan.read_shape(Q7)
    base = {"engine": {"kind": "vllm", "max_model_len": 8192}, "num_gpus": 1}
    (half,) = plan.plan_config(ServeConfig(**{**base, "engine": {**base["engine"], "gpu_memory_utilization": 0.4}}),
                               shape, H100)
    one = half.need - half.items["the next model during a reload"]
    assert half.items["the next model during a reload"] == pytest.approx(one - plan.CUDA_CONTEXT) and half.fits
    (full,) = plan.plan_config(ServeConfig(**base), shape, H100)  # 0.85 of the GPU twice
    assert not full.fits and any("reload" in f for f in full.fixes)


def test_engine_placement_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="tensor_parallel_size 2"):
        load_config(ScoreConfig, None, {"engine.kind": "vllm", "engine.tensor_parallel_size": 2, "pool.num_gpus": 1})
    with pytest.raises(ConfigError, match="gpu_memory_utilization 0.85 is more than the actor's 0.5 GPU"):
        load_config(ScoreConfig, None, {"engine.kind": "vllm", "pool.num_gpus": 0.5})
    ok = load_config(ScoreConfig, None, {"engine.kind": "vllm", "engine.tensor_parallel_size": 2, "pool.num_gpus": 2})
    assert ok.engine.for_stage("score").runners == ("score",)
    assert ok.engine.for_stage("decode").runners == ("generate",)
    assert ok.engine.model_copy(update={"scorer": "topk"}).for_stage("score").runners == ("generate",)


def test_a_command_refuses_a_misfit_before_any_engine_starts(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"id": "a", "prompt": "1+1?", "response": "2"}) + "\n")
    config = tmp_path / "score.yaml"
    config.write_text(f"engine: {{kind: vllm, model: {Q7}, dtype: float32, max_model_len: 8192}}\n"
                      "pool: {num_gpus: 1}\n")
    monkeypatch.setenv("OPSFT_GPU_MEMORY_GIB", "24")
    rc = main(["score", "--config", str(config), "--input", str(corpus), "--output", str(tmp_path / "out.parquet")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot fit a 24 GiB GPU" in err and "engine.dtype: bfloat16" in err
    assert not (tmp_path / "out.parquet").exists()


def test_cycle_refuses_a_misfit(tmp_path, monkeypatch):
    from opsft.plan import PlanError
    from opsft.realign.cycle import Cycle

    monkeypatch.setenv("OPSFT_GPU_MEMORY_GIB", "80")
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(json.dumps({"id": "a", "prompt": "1+1?", "response": "2"}) + "\n")
    cfg = RealignConfig(corpus=str(corpus), output_dir=str(tmp_path / "out"), model=Q7,
                        train={"scaling": {"num_workers": 8, "use_gpu": True, "strategy": "ddp"}})
    called = []
    cycle = Cycle(cfg, runners={s: (lambda *a, s=s: called.append(s) or {}) for s in ("score",)})
    monkeypatch.setattr("opsft.realign.cycle._connect", lambda cycle: None)
    monkeypatch.setattr(Cycle, "current_model", lambda self: Q7)
    with pytest.raises(PlanError, match="train does not fit"):
        cycle.run()
    assert called == []


def test_hostile_configs(tmp_path):
    with pytest.raises(ValueError, match="no hidden_size"):
        plan.shape_from_config({"model_type": "t5", "d_ff": 2048})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError):
        plan.read_shape(tmp_path)
    (tmp_path / "plan.yaml").write_text("applications: [{name: x, import_path: other.app:app}]\n")
    with pytest.raises(ValueError, match="no opsft application"):
        plan.load_any_config(str(tmp_path / "plan.yaml"))
    (tmp_path / "train.yaml").write_text("lr: 1.0e-5\nscaling: {num_workers: 2, use_gpu: true, bogus: 1}\n")
    with pytest.raises(ConfigError, match="bogus"):
        plan.load_any_config(str(tmp_path / "train.yaml"))


def test_multimodal_and_latent_attention_shapes():
    # a text_config nested in a multimodal config is read; DeepSeek's latent attention caches the latent
    nested = {"model_type": "llava", "text_config": json.loads((Path(Q7) / "config.json").read_text())}
    assert plan.shape_from_config(nested).params == 7_615_616_512
    mla = {"model_type": "deepseek_v2", "hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 8,
           "vocab_size": 1000, "kv_lora_rank": 128, "qk_rope_head_dim": 32, "intermediate_size": 2048}
    assert plan.shape_from_config(mla).kv_bytes_per_token(2) == 2 * (128 + 32) * 2
