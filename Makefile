# The two commands a fresh machine needs (README): `make run` and `make test`. Each sets up
# what is missing first: a local venv (.venv) with the pinned set in requirements/, then
# ops._C built in place (CUDA half included whenever nvcc is found; OPS_CUDA=0 to skip it).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The venv's tools (its pinned cmake and ninja) come first for the build.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# pip on this machine kind warns about missing local index folders on every package; noise.
# (grep exits 1 when it filtered everything: that is not a failure; pip's own status still is.)
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || test $$? -eq 1; }

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ops-built
KERNEL_SOURCES := $(wildcard csrc/*) setup.py CMakeLists.txt pyproject.toml

.PHONY: run test bench profile-all setup freeze clean

## run: the main job on its built-in default (the layer-wise profiler: PyTorch, ResNet-20)
run: setup
	$(PY) -m profiler.layerwise

## test: the whole test suite (GPU tests skip with a reason where there is no GPU)
test: setup
	$(PY) -m pytest -q

## bench: the kernel benchmark with more rounds, written to runs/bench_kernels.json
bench: setup
	$(PY) -m experiments.bench_kernels --rounds 15 --out runs/bench_kernels.json

## profile-all: the profiler on all four frameworks, merged (runs/layerwise/all-resnet20)
profile-all: setup
	$(PY) -m profiler.layerwise --framework all

setup: $(BUILD_STAMP)

$(DEPS_STAMP): requirements/base.txt requirements/constraints.txt requirements/chainer.txt requirements/tools.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/tools.txt $(QUIET_PIP)
	$(PY) -m pip install -q -r requirements/base.txt -c requirements/constraints.txt $(QUIET_PIP)
	$(PY) -m pip install -q --no-build-isolation -r requirements/chainer.txt -c requirements/constraints.txt $(QUIET_PIP)
	$(PY) -m pip check
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(KERNEL_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . $(QUIET_PIP)
	$(PY) -c "import ops; print('ops._C built:', ops.build_info())"
	touch $@

## freeze: rewrite requirements/constraints.txt from the current venv
freeze:
	{ head -n 2 requirements/constraints.txt; $(PY) -m pip freeze --exclude-editable | \
	  sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean:
	rm -rf build $(VENV) ops/_C*.so *.egg-info
