"""The on-policy data recipe as plain data: its policies, its stages (and the engine capability
each needs) and its settings (RewriteParams, with every default written here once). Torch-free:
opsft.config builds RewriteConfig's fields and defaults from these, opsft.stages plans a job's
engine stages with them, opsft.recipe runs them.

    params = RewriteParams.from_fields({"policy": "hd-all", "beta": 2.0})   # flat fields, as in RewriteConfig
    params.fields()["beta"] == 2.0
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from opsft.data.hints import HINT_CUTS, HINT_PROMPTS, MISSING_HINT, OUTPUT_STOPS
from opsft.method.hinted_params import HDParams

POLICIES = ("self-first", "hd-all")
# The recipe as stages, each rows -> rows (same rows, same order): what `opsft rewrite` runs in one
# process and what its --ray job runs as one Ray Data pipeline, one actor pool or task per stage.
STAGES = ("self-answer", "verify-self", "hint", "hinted-decoding", "verify", "score")
# The engine capability each stage needs (opsft.engines.base.CAPABILITIES); None: a CPU task, no engine.
STAGE_NEEDS = {"self-answer": "generate", "verify-self": None, "hint": "generate", "hinted-decoding": "decode",
               "verify": None, "score": "score"}
ENGINE_STAGES = tuple(stage for stage, need in STAGE_NEEDS.items() if need is not None)
# What the recipe adds to the decoder's official rules: no end before content, a stop at a hint header.
RECIPE_HD = {"stop_strings": OUTPUT_STOPS, "hold_eos": True}
# The decoder settings a recipe exposes (flat, by the same names as HDParams' fields).
HD_FIELDS = ("beta", "lambda_mode", "sigmoid_center", "piecewise_bounds", "temperature", "top_p", "max_new_tokens",
             "seed", "splitter")


def stages_for(policy: str) -> tuple[str, ...]:
    """The stages a policy runs, in order (hd-all has no self-answer)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return STAGES if policy == "self-first" else STAGES[2:]


@dataclass(frozen=True)
class RewriteParams:
    """The recipe's settings. `hd`: the hinted decoder's, greedy by default (the best setting across four task
    families, docs/hinted_decoding.md; the official default is temperature 0.3) with the recipe's RECIPE_HD."""

    policy: str = "self-first"
    hd: HDParams = field(default_factory=lambda: HDParams(temperature=0.0, **RECIPE_HD))
    hint_max_new_tokens: int = 512
    missing_hint: str = "cot"     # "cot" (hinted stream opens at "# CoT:") or "skip" (official: finish_reason no_hint)
    hint_cut: str = "line"        # where the analysis prefix ends: "line" (after "# CoT:\n") or "marker" (official)
    hint_prompt: str = "analyze"  # "analyze" (the model's analysis first) or "direct" (no hint generated)
    batch_size: int = 16          # items per hinted-decoding batch
    drop_unverified: bool = False
    verifier: str = "auto"        # opsft.data.verify.make_verifier name

    def __post_init__(self):
        for name, allowed in (("policy", POLICIES), ("missing_hint", MISSING_HINT), ("hint_cut", HINT_CUTS),
                              ("hint_prompt", HINT_PROMPTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.hint_max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("need hint_max_new_tokens >= 1 and batch_size >= 1")

    @classmethod
    def from_fields(cls, values: dict) -> RewriteParams:
        """From flat fields (RewriteParams' own and HD_FIELDS, as RewriteConfig names them); unset fields keep
        their defaults. An unknown name is an error. An empty splitter means none."""
        known = (set(cls.__dataclass_fields__) - {"hd"}) | set(HD_FIELDS)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown rewrite setting(s): {', '.join(sorted(unknown))}")
        base = cls()
        hd = {name: values[name] for name in HD_FIELDS if name in values}
        if "piecewise_bounds" in hd:
            hd["piecewise_bounds"] = tuple(hd["piecewise_bounds"])
        if "splitter" in hd:
            hd["splitter"] = hd["splitter"] or None
        own = {name: value for name, value in values.items() if name not in HD_FIELDS}
        return replace(base, hd=replace(base.hd, **hd), **own)

    def fields(self) -> dict:
        """The flat fields (from_fields' inverse; JSON-ready: tuples as lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hd"}
        out.update({name: getattr(self.hd, name) for name in HD_FIELDS})
        out["piecewise_bounds"] = list(out["piecewise_bounds"])
        return out
