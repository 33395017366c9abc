# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv and install the project into it first (once; re-run when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast crds bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	touch $(STAMP)

## make demo: train the tiny preset on synthetic code on CPU, sample, plot the loss.
demo: $(STAMP)
	$(PY) -m nanochat_trainer.demo --out runs/demo

## make test: every test (unit, integration; e2e ones join when their cluster is built).
test: $(STAMP)
	$(PY) -m pytest -q

crds: $(STAMP)
	$(VENV)/bin/nanochat crds

bench: $(STAMP)
	$(PY) bench/train_throughput.py --preset tiny --steps 20

clean:
	rm -rf runs .pytest_cache
