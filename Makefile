PY ?= python3
.PHONY: install test test-fast demo gpu-test bench slurm-up slurm-down

# Where no torch is installed, the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

test: install
	$(PY) -m pytest -q --timeout=900 tests

test-fast:
	$(PY) -m pytest -q -m "not slow and not distributed" tests

# The main job on the embedded tiny teacher (CPU, minutes). Extra overrides: make demo ARGS="..."
demo: install
	$(PY) -m factory.prime +recipe=gdn_50pct $(ARGS)

gpu-test:
	$(PY) -m pytest -q tests/gpu

bench:
	$(PY) bench/bench_gdn_layer.py

# tests/launch needs a local one-node SLURM cluster (and strace for its write audit): installed with
# apt-get where missing and started; exit code 3 = cannot be installed here, and those tests skip.
slurm-up:
	launch/local_cluster/start.sh || [ $$? -eq 3 ]
	command -v strace >/dev/null || apt-get install -y -qq --no-install-recommends strace >/dev/null || true

slurm-down:
	launch/local_cluster/stop.sh
