"""Every flag, config or path error is one line that says what is wrong, before any work starts;
an output path equal to an input is refused and the input is left as it was."""

from __future__ import annotations

import pytest
from opsft.cli import main
from opsft.config import ConfigError, RealignConfig, ScoreConfig, load_config


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def test_config_errors_are_one_line_naming_key_value_and_source(tmp_path):
    with pytest.raises(ConfigError) as flag:
        load_config(ScoreConfig, None, {"engine.max_batch_size": 0})
    assert str(flag.value) == ("engine.max_batch_size: must be greater than or equal to 1 "
                               "(got 0, from a command-line flag)")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("engine:\n  kind: foo\n  bogus: 1\ntemperature: -1\n")
    message = str(pytest.raises(ConfigError, load_config, ScoreConfig, yaml_file).value)
    assert "\n" not in message
    assert f"engine.kind: must be 'hf', 'vllm' or 'fake' (got 'foo', in {yaml_file})" in message
    assert f"engine.bogus: unknown setting (in {yaml_file}" in message
    assert "temperature: must be greater than 0" in message
    yaml_file.write_text("a: [1\n")
    assert "not valid YAML (line 2" in str(pytest.raises(ConfigError, load_config, ScoreConfig, yaml_file).value)
    assert "corpus: required, but not set" in str(pytest.raises(ConfigError, load_config, RealignConfig).value)


@pytest.mark.parametrize("argv,fragment", [
    (["score", "--input", "{c}", "--output", "{c}"], "is the input"),
    (["score", "--input", "{c}", "--output", "{d}/../d/c.jsonl", "--ray"], "is the input"),
    (["rewrite", "--input", "{c}", "--output", "{c}"], "is the input"),
    (["pairs", "--input", "{c}", "--output", "{c}"], "is the input"),
    (["report", "--input", "x={c}", "--output", "{c}"], "is the input"),
    (["train", "--input", "{c}", "--output-dir", "{c}"], "is the input"),
    (["eval", "--exclude", "{d}/items.jsonl", "--output", "{d}", "--tasks", "chain_sum:1"], "is the input"),
    (["score", "--input", "{c}", "--output", "{d}/out.jsonl", "--batch-size", "0"],
     "engine.max_batch_size: must be greater than or equal to 1 (got 0, from a command-line flag)"),
    (["score", "--input", "{c}", "--output", "{d}/out.csv"], "unknown corpus format"),
    (["score", "--input", "{d}/missing.jsonl", "--output", "{d}/out.jsonl"], "no such corpus file"),
    (["rewrite", "--input", "{c}", "--output", "{d}/o.jsonl", "--beta", "-1", "--max-new-tokens", "0"],
     "beta: must be greater than or equal to 0"),
    (["train", "--input", "{c}", "--output-dir", "{d}/run", "--workers", "0"], "scaling.num_workers: must be"),
])
def test_cli_errors_are_one_line_and_leave_the_input_alone(tmp_path, capsys, argv, fragment):
    d = tmp_path / "d"
    d.mkdir()
    corpus = d / "c.jsonl"
    corpus.write_text('{"prompt": "q", "response": "a"}\n')
    (d / "items.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    code, err = run_cli(capsys, *[a.format(c=corpus, d=d) for a in argv])
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"opsft {argv[0]}: error: ") and fragment in err[0], err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing written, nothing touched
