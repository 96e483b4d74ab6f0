# Two commands set everything up on a fresh machine:
#   make demo   — install, train the tiny `demo` preset on the built-in synthetic data, write a sample grid
#   make test   — install with test extras, lint, run the test suite (make test-fast: without the end-to-end tests)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DIFFIT := $(VENV)/bin/diffit

.PHONY: demo test test-fast test-cuda lint format install clean bench

# the package alone (what `make demo` needs), then the test extras on top (what `make test` needs)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(DIFFIT) train --preset demo --run-dir runs/demo
	@echo "Sample grids: runs/demo/samples/ (latest: runs/demo/samples/grid-latest.png); curves: runs/demo/curves.png"

# ruff: the formatter's layout and the linter's rules (pyproject.toml [tool.ruff]); `make format` applies them
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# the suite without the tests that train, sample, encode or score end to end (about a minute)
test-fast: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not e2e"

# the CUDA checks (the main suite hides GPUs: it pins CPU semantics); needs a GPU
test-cuda: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 DIFFIT_TEST_CUDA=1 $(PY) -m pytest -q tests/test_cuda.py

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_networks.py --quick
	$(PY) benchmarks/bench_samplers.py --quick
	$(PY) benchmarks/bench_attention.py --quick

clean:
	rm -rf $(VENV) runs build dist *.egg-info
