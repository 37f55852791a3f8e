PY ?= python3
.PHONY: install test test-fast demo gpu-test bench

# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

test: install
	$(PY) -m pytest -q -x --timeout=900 tests

test-fast:
	$(PY) -m pytest -q -x -m "not slow and not distributed" tests

demo:
	$(PY) -m factory.prime +recipe=gdn_50pct

gpu-test:
	$(PY) -m pytest -q tests/gpu
