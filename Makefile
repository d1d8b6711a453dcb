# Two commands for a fresh machine (README): `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

# Ray runs trials side by side on the same cores; OpenMP threads that spin while they wait for work then starve
# each other (measured here: 2-thread training 10-30x slower under load). Passive waiting avoids that.
export OMP_WAIT_POLICY ?= PASSIVE

demo: $(VENV)/.installed
	$(VENV)/bin/csl-search run spaces/smoke.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q
