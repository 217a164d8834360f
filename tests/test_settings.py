"""Each setting's default and allowed values are written once: the recipe's in opsft.recipe_plan
(RewriteParams), the decoder's in opsft.method.hinted_params, the hint's in opsft.data.hints, the
engines' in opsft.config.EngineConfig. These tests tie the layers together: the config's defaults
are the recipe's, the engines' constructors default to the config's values, and every CLI flag's
choices and default come from the config field it sets.

    .venv/bin/python -m pytest -q tests/test_settings.py
"""

from __future__ import annotations

import inspect
import typing

import pytest
from opsft.cli import build_parser
from opsft.config import EngineConfig, EvalConfig, RewriteConfig, ScoreConfig, ServeConfig, TrainConfig
from opsft.method.hinted_params import LAMBDA_MODES, HDParams
from opsft.recipe_plan import HD_FIELDS, POLICIES, RECIPE_HD, RewriteParams


def test_rewrite_config_defaults_are_the_recipes():
    cfg = RewriteConfig()
    assert cfg.recipe_fields() == RewriteParams().fields()
    assert cfg.params() == RewriteParams()
    # the recipe's decoder differs from the official decoder only where the recipe says so
    official = HDParams()
    assert RewriteParams().hd == HDParams(**{**official.__dict__, "temperature": 0.0, **RECIPE_HD})
    assert official.temperature == 0.3  # method.md: the official sampling temperature


def test_rewrite_fields_round_trip_and_reach_the_decoder():
    cfg = RewriteConfig(policy="hd-all", beta=2.0, lambda_mode="sigmoid", piecewise_bounds=(0.2, 0.9), splitter="",
                        temperature=0.5, seed=7, hint_cut="marker", batch_size=3)
    params = cfg.params()
    assert (params.policy, params.hint_cut, params.batch_size) == ("hd-all", "marker", 3)
    assert (params.hd.beta, params.hd.lambda_mode, params.hd.piecewise_bounds) == (2.0, "sigmoid", (0.2, 0.9))
    assert params.hd.splitter is None and params.hd.temperature == 0.5 and params.hd.seed == 7
    assert RewriteParams.from_fields(params.fields()) == params
    assert set(HD_FIELDS) <= set(cfg.recipe_fields())
    with pytest.raises(ValueError, match="unknown rewrite setting"):
        RewriteParams.from_fields({"bta": 1.0})
    with pytest.raises(ValueError, match="unknown rewrite setting"):
        RewriteParams.from_fields({"hd": {}})  # the decoder's settings are flat fields
    with pytest.raises(ValueError, match="policy must be one of"):
        RewriteParams.from_fields({"policy": "sometimes"})
    # what only the method can judge is refused when the config loads, in one line
    from opsft.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="piecewise_bounds must be"):
        load_config(RewriteConfig, None, {"piecewise_bounds": [0.7, 0.3]})


def literal_values(annotation) -> tuple:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return ()


def test_config_choices_are_the_method_vocabularies():
    fields = RewriteConfig.model_fields
    assert literal_values(fields["policy"].annotation) == POLICIES
    assert literal_values(fields["lambda_mode"].annotation) == LAMBDA_MODES


def subcommand_actions(name: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[name]._actions}


@pytest.mark.parametrize("command, model", [("score", ScoreConfig), ("rewrite", RewriteConfig),
                                            ("eval", EvalConfig), ("serve", ServeConfig), ("train", TrainConfig)])
def test_every_setting_flag_takes_its_choices_and_default_from_the_config(command, model):
    from importlib import import_module

    flags = import_module(f"opsft.cli.{command}").FLAGS
    actions = subcommand_actions(command)
    assert flags.keys, command
    for dest, key in flags.keys.items():
        action = actions[dest]
        if action.const is False:  # --no-fused-head: a switch that turns a default on off
            continue
        info = EngineConfig.model_fields["kind"] if key.endswith("engine.kind") else None
        if info is None:
            node = model
            *path, last = key.split(".")
            for part in path:
                node = node.model_fields[part].annotation
            info = node.model_fields[last]
        values = literal_values(info.annotation)
        assert tuple(action.choices or ()) == values, (command, key)
        default = info.get_default(call_default_factory=True)
        if not (default is None or default is False or default == ""):
            assert f"(default {default})" in action.help.replace("%%", "%"), (command, key, action.help)
        assert action.default is None  # an unset flag never overrides the config file


def test_rewrite_flags_set_the_recipe():
    from opsft.cli.rewrite import FLAGS, RECIPE_FLAGS

    args = build_parser().parse_args(["rewrite", "--lambda-mode", "piecewise", "--beta", "1.5", "--hd-engine", "hf",
                                      "--drop-unverified"])
    overrides = FLAGS.overrides(args)
    assert overrides["lambda_mode"] == "piecewise" and overrides["beta"] == 1.5
    assert overrides["stages.hinted-decoding.engine.kind"] == "hf" and overrides["drop_unverified"] is True
    assert overrides["policy"] is None  # not given: the config's (or the default) stands
    # every recipe setting but piecewise_bounds / sigmoid_center (config file only) has its flag
    assert set(RECIPE_FLAGS) == set(RewriteParams().fields()) - {"piecewise_bounds", "sigmoid_center"}


def test_engine_constructors_default_to_the_configs_values():
    """EngineConfig.options() passes every engine setting explicitly; a constructor's own default is what a
    library caller gets (HFEngine(model)), and it must be the same."""
    from opsft.engines.fake import FakeEngine
    from opsft.engines.hf import HFEngine
    from opsft.engines.vllm import VLLMEngine

    for kind, cls in {"hf": HFEngine, "vllm": VLLMEngine, "fake": FakeEngine}.items():
        options = EngineConfig(kind=kind).options()
        params = inspect.signature(cls.__init__).parameters
        for name, value in options.items():
            default = params[name].default
            assert default == value, (kind, name, default, value)
