# Two commands on a fresh machine: `make study` (the main job) and `make test`.
# Each creates .venv and installs the project (torch, ray, optuna, ...) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint format browser study smoke train bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The report test opens the HTML in Debian's headless Chromium, and the export tests (--export png,svg,pdf) render
# through it with Kaleido; they skip, saying so, where none can be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will be skipped"

# One intra-op thread per process: tests run several trials at once on small machines.
test: $(STAMP) browser lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=12 tests

# ruff: lint and format check (configuration in pyproject.toml); `make format` rewrites the files.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

study: $(STAMP)
	$(PY) studies/batch_scaling.py

smoke: $(STAMP)
	$(PY) studies/batch_scaling.py --smoke-test

train: $(STAMP)
	$(PY) -m gradalign.cli --dataset digits --algorithm gradalign --batch-size 256 --clients 16 --epochs 10 --out results/local-run

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) results
