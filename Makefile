# tfbert: `make setup run` sets everything up and trains the embedded default; `make test` tests.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra flags for `make run`, e.g. make run ARGS="--precision=bf16 --num_train_steps=100".
ARGS ?=
# Horovod is built from source against the TensorFlow installed first (the horovod[tensorflow]
# extra would pull the newest TensorFlow). On GPU machines add HOROVOD_GPU_OPERATIONS=NCCL.
HOROVOD_ENV ?= HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 \
	HOROVOD_WITHOUT_MXNET=1

.PHONY: setup ops run test bench clean

setup: $(VENV)/.tfbert-installed ops

# The fused custom ops (custom_ops/Makefile). `make ops WITH_CUDA=1` adds the CUDA kernels.
ops: $(VENV)/.tfbert-installed
	$(MAKE) -C custom_ops PYTHON=$(CURDIR)/$(PY)

$(VENV)/.tfbert-installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.3" wheel "setuptools>=64,<81"
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c "import horovod.tensorflow" 2>/dev/null || \
		$(HOROVOD_ENV) $(PY) -m pip install --no-build-isolation horovod==0.28.1
	$(PY) -c "import horovod.tensorflow, tensorflow as tf; print('tfbert set up: TF', tf.__version__)"
	touch $@

run: setup
	$(PY) -m tfbert.run $(ARGS)

# Two test processes; a file's tests stay together (they share module fixtures), and the files
# start in tests/conftest.py's order, longest first (xdist would reorder them by test count).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

# The notes' ablation table (flags/ setups at a CPU size), tfbert vs tf-models-official, the LAMB
# step five ways, the precision/XLA, data-parallel, ZeRO and tensor-parallel tables. Results under
# runs/bench/.
bench: setup
	$(PY) benchmarks/ablation.py
	$(PY) benchmarks/compare_reference.py
	$(PY) benchmarks/optimizer_bench.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/zero.py
	$(PY) benchmarks/tensor_parallel.py
	$(PY) benchmarks/inference.py --output_dir=runs/bench/inference

clean:
	$(MAKE) -C custom_ops clean
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
