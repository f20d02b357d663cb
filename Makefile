# make test   - create ./.venv if missing, install, build, run the whole suite
# make bench  - same setup, then run the benchmark suite, the end-to-end training step and the
#                tensor-parallel ops on 2 spawned ranks (results in benchmarks/results/,
#                benchmarks/results/e2e/, benchmarks/results/dist/); a full run (no
#                BENCH_ARGS) also rewrites README's performance table from its results.json
# make gpu-check - on a machine with an NVIDIA GPU: the suite + benchmarks on the GPU, with the
#                  CUDA build of torch that $(GPU_PY) imports (installs nothing: works offline);
#                  benchmark results in benchmarks/results/gpu/
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
BENCH_ARGS ?=
E2E_ARGS ?=
GPU_PY ?= python3
# xdist when installed: on a GPU machine the Triton JIT compiles dominate the suite's time
GPU_PYTEST_ARGS ?= $(shell $(GPU_PY) -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadgroup")

.PHONY: test bench gpu-check build venv lint clean

# A CUDA build of torch already importable by python3 is reused (system site packages);
# otherwise the pinned CPU build is installed from local disk.
$(VENV)/.deps: requirements-dev.txt pyproject.toml
	@if python3 -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "using the CUDA build of torch found by python3"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN); \
	fi
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

build: $(VENV)/.deps
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps

LINT_PY := lmkernels tests benchmarks examples setup.py
CXX_SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.cu csrc/include/lmk/*.h)

lint: $(VENV)/.deps
	$(PY) -m ruff check $(LINT_PY)
	$(PY) -m ruff format --check $(LINT_PY)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

# Two xdist workers of one thread each: the suite is mostly single-threaded Python (the Triton
# interpreter), so this halves its time on 2 cores; with torch's default threads the workers
# oversubscribe the cores and gain nothing (measured). Tests that need several threads set them.
test: build lint
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -n 2 --dist loadgroup

bench: build
	$(PY) -m lmkernels.bench $(BENCH_ARGS)
	$(if $(BENCH_ARGS),,$(PY) -m lmkernels.bench readme benchmarks/results/results.json)
	$(PY) -m lmkernels.bench e2e $(E2E_ARGS)
	$(PY) -m lmkernels.bench dist

gpu-check:
	$(GPU_PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: $(GPU_PY) sees no CUDA device')"
	$(GPU_PY) -m pip install -q -e . --no-build-isolation --no-deps
	$(GPU_PY) -m lmkernels info
	$(GPU_PY) -m lmkernels gpu-report
	$(GPU_PY) -m pytest tests -q $(GPU_PYTEST_ARGS)
	$(GPU_PY) -m lmkernels.bench --out benchmarks/results/gpu $(BENCH_ARGS)
	$(GPU_PY) -m lmkernels.bench e2e --out benchmarks/results/gpu/e2e $(E2E_ARGS)

clean:
	rm -rf build lmkernels/*.so *.egg-info
