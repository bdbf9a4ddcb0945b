# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint format bench gpu-check gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU torch wheel first, so no dependency range pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crepa demo

# One pytest worker per core (pytest-xdist): the suite is CPU-bound, many tests start subprocesses.
test: $(STAMP)
	$(PY) -m pytest -q -n auto

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_align.py

# On a GPU machine: the real-shape step benchmark, then pytest -m gpu beside demo --quick on CUDA (<= 8 min, offline).
# Uses .venv when it exists, else the machine's python3 with crepa's dependencies already installed.
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

# For a GPU machine without a package index: wheels of what its python lacks (Python 3.12, CUDA 13), into
# .whl; there, `python3 benchmarks/gpu_check.py --wheels .whl` installs them aside first.
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_wheels.py --out .whl

clean:
	rm -rf $(VENV) build dist src/*.egg-info
