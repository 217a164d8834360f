"""opsft: on-policy SFT (CLL scoring, IDFT, Hinted Decoding) on Ray.

The house, from the bottom up (tests/test_architecture.py enforces the direction):
- opsft.method: the method as plain torch over token ids (CLL, the loss family, hinted decoding);
- opsft.data: the data edge (corpus rules, the one reader, storage, tokenisation, the hint prompt);
- opsft.config: every setting, plain data (pydantic); opsft.recipe_plan: the recipe's stages and settings;
- opsft.engines: model runners behind one protocol (hf, vllm, fake);
- opsft.scoring, opsft.recipe, opsft.evaluation: rows in, rows out, on any engine;
- opsft.commands: one way to run each command (score a file, rewrite a file, evaluate);
- the thin Ray layer: opsft.jobs (Ray Data), opsft.train (Ray Train around a plain loop), opsft.serve
  (Ray Serve), opsft.realign (the recurring cycle); opsft.cli maps flags to all of it.
"""

import warnings

__version__ = "0.1.0"

# Deprecations inside other packages' own code that nothing we write can change, each matched by message,
# category and the module that warns, so that a new one (ours or theirs) is still seen. tests/test_warnings.py
# runs every module and the commands with warnings on. Remove an entry when its package is upgraded past it.
THIRD_PARTY_DEPRECATIONS = (
    # Ray Serve 2.60's own models (ray/serve/_private/config.py) pass `update_type=` to pydantic's Field;
    # pydantic 2 warns about that at import, 18 lines, on every `import ray.serve`.
    ("Using extra keyword arguments on `Field` is deprecated", DeprecationWarning, r"ray\.serve\._private\.config"),
    # Ray Data 2.60's DataContext.__setattr__ warns whenever these fields are set, and its own constructor sets
    # them to their defaults: every Ray Data job prints these three, whatever it configures.
    ("`use_push_based_shuffle` is deprecated", DeprecationWarning, r"ray\.data\.context"),
    ("`use_polars` is deprecated", DeprecationWarning, r"ray\.data\.context"),
    ("`use_arrow_tensor_v2` is deprecated", DeprecationWarning, r"ray\.data\.context"),
    # Ray Train 2.60's controller saves its checkpoint state with pydantic's old `.json()`.
    ("The `json` method is deprecated", DeprecationWarning, r"ray\.train\.v2\._internal\.execution\.checkpoint"),
    # Ray 2.60's job SDK opens the log stream (tail_job_logs, `opsft submit --wait`) with aiohttp's ssl=None.
    ("ssl=None is deprecated", DeprecationWarning, r"ray\.dashboard\.modules\.job\.sdk"),
)


def quiet_third_party_deprecations() -> None:
    for message, category, module in THIRD_PARTY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


quiet_third_party_deprecations()
