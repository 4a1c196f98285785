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

# The NumPy 2 venv (requirements/numpy2.txt) holds no build of its own: it imports the in-place
# ops._C and ops/libdeepprof_torch.so of the main venv's build through PYTHONPATH. That is
# sound: _C links no NumPy (arrays come through DLPack) and is built for the same Python, and
# the torch library has no rpath and is loaded after the same torch 2.13.0 loaded libtorch.
# A build from this venv would overwrite the main venv's files in ops/.
NUMPY2_VENV := .venv-numpy2
NUMPY2_PY := $(NUMPY2_VENV)/bin/python
NUMPY2_STAMP := $(NUMPY2_VENV)/.deps-installed
# The tests that need neither TensorFlow, MXNet nor Chainer (each of those needs numpy 1), less
# the CPU-only rebuild of test_build.py: it compiles the same sources, with no NumPy involved,
# and takes half a minute.
NUMPY2_TESTS := $(wildcard tests/test_sq_error_loss.py tests/test_conv2d.py \
	tests/test_torch_adapter.py tests/test_bad_input.py tests/test_build.py tests/test_cpu_paths.py)
NUMPY2_DESELECT := --deselect tests/test_build.py::test_cpu_only_build_works_and_refuses_gpu_arrays

# The oneDNN-flipped run: the TensorFlow and MXNet test files and the cross-framework
# agreement whole, and the TensorFlow and MXNet cases (their ids name the framework) of the
# files every framework shares.
# MXNet's files first: MXNet 1.9.1 imported after TensorFlow crashes the interpreter (defect 8
# in ops/mxnet/loader.py); the whole suite collects them in that order too.
ONEDNN_TESTS := $(wildcard tests/test_*mxnet*.py tests/test_*tensorflow*.py) \
	tests/test_cross_framework.py
ONEDNN_SHARED_TESTS := tests/test_workloads.py tests/test_profiler_layerwise.py
ONEDNN_SHARED_FILTER := tensorflow or mxnet
# Prints 0 where TensorFlow turns oneDNN on by default here, else 1 (TF reads its setting once).
export ONEDNN_FLIP := import os; os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None); \
	from tensorflow.python.util import _pywrap_util_port as port; \
	print(0 if port.IsMklEnabled() else 1)

# Runs a pytest command line; where it fails, also prints the id of the last test it started
# (tests/conftest.py writes it): after a native crash that is the test that crashed, which the
# fatal-error dump above may not show where only the output's tail is kept.
LAST_TEST := $(CURDIR)/$(VENV)/.last-test
define PYTEST_NAMING_A_CRASH
rm -f $(LAST_TEST); DEEPPROF_LAST_TEST=$(LAST_TEST) $(1) || { status=$$?; \
  echo "pytest exited with status $$status; the last test it started: $$(cat $(LAST_TEST) 2>/dev/null || echo none)"; \
  exit $$status; }
endef

.PHONY: run test test-onednn-flipped test-numpy2 bench profile-all experiments setup freeze clean nsys gpu-check

## run: the main job on its built-in default (the layer-wise profiler: PyTorch, ResNet-20)
run: setup
	$(PY) -m profiler.layerwise

## test: the whole test suite (GPU tests skip with a reason where there is no GPU), then the
## TensorFlow and MXNet tests with oneDNN set the other way, then the NumPy 2 run
test: setup
	$(call PYTEST_NAMING_A_CRASH,$(PY) -m pytest -q)
	$(MAKE) --no-print-directory test-onednn-flipped
	$(MAKE) --no-print-directory test-numpy2

## test-onednn-flipped: the TensorFlow and MXNet tests once more with their oneDNN setting
## flipped: TF_ENABLE_ONEDNN_OPTS the opposite of TensorFlow's default on this CPU (on where it
## has AVX-512 VNNI/BF16, off elsewhere), MXNET_MKLDNN_ENABLED=0 (its default is on)
test-onednn-flipped: setup
	$(PY) -c "$$ONEDNN_FLIP" 2>/dev/null | tail -n 1 > .venv/.onednn-flip
	flip=$$(cat .venv/.onednn-flip); \
	echo "TF_ENABLE_ONEDNN_OPTS=$$flip MXNET_MKLDNN_ENABLED=0"; \
	$(call PYTEST_NAMING_A_CRASH,TF_ENABLE_ONEDNN_OPTS=$$flip MXNET_MKLDNN_ENABLED=0 \
	  $(PY) -m pytest -q $(ONEDNN_TESTS))
	# A process of its own: after the files above, the workloads' models (DeepPose's 47M
	# parameters per framework and test) grew one process past this machine's 24 GiB.
	$(call PYTEST_NAMING_A_CRASH,TF_ENABLE_ONEDNN_OPTS=$$(cat .venv/.onednn-flip) \
	  MXNET_MKLDNN_ENABLED=0 $(PY) -m pytest -q $(ONEDNN_SHARED_TESTS) \
	  -k "$(ONEDNN_SHARED_FILTER)")

## test-numpy2: the framework-free and PyTorch tests under NumPy 2, in .venv-numpy2
test-numpy2: setup $(NUMPY2_STAMP)
	$(call PYTEST_NAMING_A_CRASH,PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	  DEEPPROF_PYTEST_HARD_EXIT=1 $(NUMPY2_PY) -m pytest -q $(NUMPY2_TESTS) $(NUMPY2_DESELECT))

## bench: the kernel benchmark with more rounds, written to runs/bench_kernels.json
bench: setup
	$(PY) -m experiments.bench_kernels --rounds 15 --out runs/bench_kernels.json

## experiments: every study of experiments/ at the quick scale, each in its default --mode
## (resnet_depth, swap, parity: eager and graph; about 32 minutes on 2 cores), then
## runs/experiments/REPORT.md with Tables A and B; each study is also
## `python -m experiments.<study>`
EXPERIMENTS := parity resnet_depth deeppose_loss swap data_loading
# A study that fails still leaves its result.json (the report lists it); make fails at the end.
experiments: setup
	status=0; for s in $(EXPERIMENTS); do $(PY) -m experiments.$$s || status=1; done; \
	$(PY) -m experiments.report; exit $$status

## profile-all: the profiler on all four frameworks, merged (runs/layerwise/all-resnet20)
profile-all: setup
	$(PY) -m profiler.layerwise --framework all

## gpu-check: the prepared GPU check (scripts/gpu_check.py, docs/gpu.md) on the GPU
## machine, with its own Python (/opt/torch/.venv), under BUDGET_S seconds; DRY_RUN=1 here,
## without a GPU: the plan, every step's command checked, the budget handling tried
GPU_CHECK_PYTHON ?= $(firstword $(wildcard /opt/torch/.venv/bin/python) $(PY))
BUDGET_S ?= 480
ifeq ($(DRY_RUN),1)
gpu-check: setup
	$(PY) scripts/gpu_check.py --dry-run --budget-s $(BUDGET_S)
else
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_CHECK_PYTHON) scripts/gpu_check.py --budget-s $(BUDGET_S)
endif

## nsys: install Nsight Systems (Debian's nsight-systems, as root; about a minute on a fresh
## machine, nothing when nsys already works) for `python -m profiler.layerwise --nsys`
nsys:
	bash scripts/install_nsys.sh

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

# --no-compile: byte-compiling all of torch at install was half the install time (30 of 60 s);
# Python compiles what the tests import on the way.
$(NUMPY2_STAMP): requirements/numpy2.txt requirements/tools.txt
	test -x $(NUMPY2_PY) || $(PYTHON) -m venv $(NUMPY2_VENV)
	$(NUMPY2_PY) -m pip install -q -r requirements/tools.txt $(QUIET_PIP)
	$(NUMPY2_PY) -m pip install -q --no-compile -r requirements/numpy2.txt $(QUIET_PIP)
	$(NUMPY2_PY) -m pip check
	touch $@

## freeze: rewrite requirements/constraints.txt from the current venv
freeze:
	{ head -n 2 requirements/constraints.txt; $(PY) -m pip freeze --exclude-editable | \
	  sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean:
	rm -rf build $(VENV) ops/_C*.so *.egg-info
