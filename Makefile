# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install the project into it first (once; re-run when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint gpt2-bpe e2e-tools e2e cluster crds bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	touch $(STAMP)

## make demo: train the tiny preset on synthetic code on CPU, sample, plot the loss.
demo: $(STAMP) gpt2-bpe
	$(PY) -m nanochat_trainer.demo --out runs/demo

## make test: the lint checks, then every test: unit, integration, and e2e on a real control plane.
test: lint $(STAMP) gpt2-bpe e2e-tools
	$(PY) -m pytest -q

## make test-fast: the lint checks and the tests not marked slow or e2e (a few minutes; no Go tools).
test-fast: lint $(STAMP) gpt2-bpe
	$(PY) -m pytest -q -m "not slow and not e2e"

## make lint: ruff (lint and format) and the import-layering contracts (pyproject.toml); seconds.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

## GPT-2's BPE in tiktoken's cache, offline and checked by its sha256: taken from openai-whisper's
## source distribution on PyPI (whisper/assets/gpt2.tiktoken is r50k_base byte for byte), once.
WHISPER := openai-whisper==20250625
WHISPER_DIR := $(HOME)/.cache/nanochat-tools/$(subst ==,-,$(WHISPER))
gpt2-bpe: $(STAMP)
	@$(VENV)/bin/nanochat tokenizer gpt2 >/dev/null 2>&1 || { \
	  $(PY) -m pip download -q --no-deps --no-binary :all: $(WHISPER) -d $(WHISPER_DIR) && \
	  $(VENV)/bin/nanochat tokenizer gpt2 --from-sdist $(WHISPER_DIR)/openai_whisper-20250625.tar.gz; }

## The e2e control plane's binaries (kube-apiserver, controller manager, scheduler, kubectl,
## etcd, kwok, helm) and promtool, built with Go at the versions in e2e/versions.env into
## ~/.cache/nanochat-tools (outside the repo), once; tens of minutes on 2 cores the first time (promtool alone about 4).
e2e-tools:
	e2e/tools.sh all >/dev/null

## make e2e: only the end-to-end tests.
e2e: $(STAMP) e2e-tools
	$(PY) -m pytest -q tests/e2e

## make cluster: a control plane to poke at by hand (prints its KUBECONFIG; Ctrl-C stops it).
cluster: $(STAMP) e2e-tools
	$(PY) e2e/cluster.py up

crds: $(STAMP)
	$(VENV)/bin/nanochat crds

bench: $(STAMP)
	$(PY) bench/train_throughput.py --preset tiny --steps 20

## make gpu-check: every CUDA path once (training eager and compiled, MoE grouped_mm and loop, the hybrid's
## kernels against transformers, packed ternary, generation, HumanEval, nanochat serve): one table and
## gpu_check.json; fails on any error. Under 8 minutes on one H100/H200; on CPU, tiny sizes in about a minute.
## On a GPU machine without a package index: bench/gpu_prepare.sh here, bench/gpu_session.sh there.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

clean:
	rm -rf runs .pytest_cache
