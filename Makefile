# Quick start: `make demo` (install + train + evaluate on the embedded set),
# `make test` (install + test suite). Installing twice is a no-op: the install
# is redone only when setup.cfg changes or .venv is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install demo test lint parity clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The demo opts in to host_memory's kept heap where JAX can only use the CPU
# (VITRET_MALLOC=auto): a faster step for more resident memory, measured in
# docs/benchmarks.md. `make demo VITRET_MALLOC=off` declines.
VITRET_MALLOC ?= auto

demo: $(STAMP)
	VITRET_MALLOC=$(VITRET_MALLOC) $(PY) -m vitret_jax.main \
	    --config=configs/demo.py --workdir=$(WORKDIR)

# Three pytest workers (pytest-xdist) share the JAX compilation cache: on
# 2 cores a third keeps them busy while a test waits on the processes it
# starts (the whole machine peaked under 8 GB with three); on a larger
# machine TEST_WORKERS=4 or more (each worker holds 8 simulated devices and
# up to ~7 GiB), TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# pyflakes + pycodestyle at 80 columns (pyproject.toml [tool.ruff]).
lint: $(STAMP)
	$(PY) -m ruff check --no-cache .

# Full-size parity with timm: installs the reference stack (CPU torch, timm
# without its torchvision pin pulling a CUDA torch) and prints the table.
parity: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps timm==1.0.31 torchvision==0.28.0
	$(PY) -m pip install --quiet huggingface-hub pyyaml
	$(PY) tools/timm_parity.py
	$(PY) -m pytest -q -m parity tests/test_weights.py

clean-demo:
	rm -rf $(WORKDIR)
