"""No deprecation warning from us or the packages we call: every module imports with deprecations as
errors, and each command, run as a user runs it with warnings on (PYTHONWARNINGS=default), prints none.
The few that other packages raise inside their own code are listed, by message, category and module, in
opsft.THIRD_PARTY_DEPRECATIONS; anything else fails here. The test suite itself turns deprecations
warned from opsft's modules into errors (pyproject.toml, filterwarnings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# "path:line: SomeDeprecationWarning: text" as Python's warnings module prints it (Ray's and pydantic's
# deprecation classes end or contain "Deprecat"; transformers warns FutureWarning)
DEPRECATION = re.compile(r": (\w*Deprecat\w*|FutureWarning|PendingDeprecationWarning): ")
ROWS = [{"id": f"r{i}", "prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}."} for i in range(6)]


def run_with_warnings(*argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def deprecations(text: str) -> list[str]:
    return [line for line in text.splitlines() if DEPRECATION.search(line)]


def test_the_pattern_finds_the_warnings_python_prints():
    import warnings

    lines = [warnings.formatwarning("gone soon", category, "x.py", 3).strip()
             for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning, UserWarning)]
    assert [bool(DEPRECATION.search(line)) for line in lines] == [True, True, True, False]
    assert DEPRECATION.search("ray/data/dataset.py:220: RayDeprecationWarning: `ray_remote_args_fn` is deprecated")


def test_every_module_imports_with_deprecations_as_errors(tmp_path):
    code = ("import importlib, pkgutil, opsft\n"
            "names = [m.name for m in pkgutil.walk_packages(opsft.__path__, 'opsft.')\n"
            "         if not m.name.endswith('__main__')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "print(len(names))\n")
    done = run_with_warnings("-W", "error::DeprecationWarning", "-W", "error::FutureWarning",
                             "-W", "error::PendingDeprecationWarning", "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 50


def test_the_third_party_filter_is_narrow():
    """The listed Ray Serve warning is silenced; the same category from anywhere else still shows."""
    import warnings

    import opsft

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        opsft.quiet_third_party_deprecations()
        for message, category, module in opsft.THIRD_PARTY_DEPRECATIONS:
            warnings.warn_explicit(message + " (x)", category, "config.py", 1, module=module.replace("\\", ""))
            warnings.warn_explicit(message + " (x)", category, "ours.py", 1, module="opsft.something")
    assert [str(w.message) for w in seen] == [m + " (x)" for m, _, _ in opsft.THIRD_PARTY_DEPRECATIONS]


@pytest.mark.slow
def test_commands_print_no_deprecation_warnings(tmp_path, tiny_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cli = ("-m", "opsft.cli")
    commands = {
        "help": [*cli, "--help"],
        "score": [*cli, "score", "--input", str(corpus), "--output", "scored.jsonl", "--model", tiny_dir],
        "score --ray": [*cli, "score", "--input", str(corpus), "--output", "scored.parquet", "--model", tiny_dir,
                        "--ray"],
        "rewrite": [*cli, "rewrite", "--input", str(corpus), "--output", "rewritten.jsonl", "--model", tiny_dir,
                    "--max-new-tokens", "4", "--verifier", "numeric"],
        "train --local": [*cli, "train", "--input", str(corpus), "--output-dir", "run", "--model", tiny_dir,
                          "--max-steps", "1", "--global-batch-size", "2", "--micro-batch-size", "2", "--local"],
        "train (Ray Train)": [*cli, "train", "--input", str(corpus), "--output-dir", "run-ray", "--model", tiny_dir,
                              "--max-steps", "1", "--global-batch-size", "2", "--micro-batch-size", "2"],
        "schedule --next": [*cli, "schedule", "--cron", "*/30 * * * *", "--timezone", "Europe/Paris", "--next", "3"],
    }
    found = {}
    for name, argv in commands.items():
        done = run_with_warnings(*argv, cwd=tmp_path)
        assert done.returncode == 0, (name, done.stderr[-3000:])
        found[name] = deprecations(done.stdout + done.stderr)
    assert found == {name: [] for name in commands}
