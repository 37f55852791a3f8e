PY ?= python3
.PHONY: install lint test test-fast test-transformers-other-end demo gpu-test bench slurm-up slurm-down

# Where no torch is installed, the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"

test: install lint
	$(PY) -m pytest -q --timeout=900 --durations=25 tests
	$(MAKE) test-transformers-other-end

# The supported transformers range is TF_ENDS (pyproject.toml). The suite runs on the installed one;
# the Qwen3.5 export tests (stock load, equal logits, cached generation, vLLM names) also run on the
# other end, in a second virtual environment over the system packages (a few minutes). The venv
# borrows the system's pip (no pip of its own to install), and pip leaves byte-compiling to the imports
# (compiling all of transformers took most of a minute; the tests import a small part of it).
TF_ENDS ?= 5.17.0 5.23.0
TF_VENV ?= .venv-transformers
test-transformers-other-end:
	@tf=$$($(PY) -c "import transformers; print(transformers.__version__)"); \
	other=$$(for v in $(TF_ENDS); do case "$$tf" in "$${v%.*}".*) ;; *) echo $$v ;; esac; done | head -n 1); \
	echo "transformers $$tf installed; export tests on $$other"; \
	$(PY) -m venv --without-pip --system-site-packages $(TF_VENV) && \
	$(TF_VENV)/bin/python -m pip install -q --no-compile "transformers==$$other" && \
	PYTHONPATH=$(CURDIR) $(TF_VENV)/bin/python -m pytest -q -p no:cacheprovider --timeout=900 \
		tests/unit/test_qwen3_5_export.py tests/unit/test_qwen3_5_vllm_names.py

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

# tests/launch needs a local one-node SLURM cluster (and strace for its write audit): installed with
# apt-get where missing and started; exit code 3 = cannot be installed here, and those tests skip.
slurm-up:
	launch/local_cluster/start.sh || [ $$? -eq 3 ]
	command -v strace >/dev/null || apt-get install -y -qq --no-install-recommends strace >/dev/null || true

slurm-down:
	launch/local_cluster/stop.sh
