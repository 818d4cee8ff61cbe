# Two commands on a fresh machine: `make study` (the main job) and `make test`.
# Each creates .venv and installs the project (torch, ray, optuna, ...) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test study tune bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

study: $(STAMP)
	$(PY) -m gradalign.cli --dataset digits --algorithm gradalign --batch-size 256 --clients 8 --epochs 10 --out results/local-run

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) results
