# Quick start: `make demo` (install + train + evaluate on the embedded set),
# `make test` (install + test suite). Installing twice is a no-op: the install
# is redone only when setup.cfg changes or .venv is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install demo test clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vitret_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(WORKDIR)
