PY ?= python3
.PHONY: install lint test test-fast demo gpu-test bench

# Where no torch is installed, the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

test: install lint
	$(PY) -m pytest -q --timeout=900 tests

# Import contracts (pyproject [tool.importlinter]: dependencies point one way) and ruff.
lint:
	lint-imports
	ruff check

test-fast:
	$(PY) -m pytest -q -m "not slow and not distributed" tests

# The main job on the embedded tiny teacher (CPU, minutes). Extra overrides: make demo ARGS="..."
demo: install
	$(PY) -m factory.prime +recipe=gdn_50pct $(ARGS)

gpu-test:
	$(PY) -m pytest -q tests/gpu

bench:
	$(PY) bench/bench_gdn_layer.py
