# Two entry points (README.md): `make demo` sets up and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2

.PHONY: setup demo test test-fast gpu-test
setup:
	@bash tools/setup_env.sh

demo: setup
	NPROC=$(NPROC) PY=$(PY) bash examples/quickstart.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

gpu-test: setup
	$(PY) -m pytest -q tests/gpu

.PHONY: gpu-check
# The prepared one-shot GPU check (docs/scaling.md); GPU_CHECK_ARGS=--smoke runs it at toy size on the CPU.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PY) tools/gpu_check.py --out gpu_check.json $(GPU_CHECK_ARGS)

.PHONY: self-evolve
# LongPO's self-evolution loop end to end on CPU at toy scale (docs/self_evolution.md);
# SELF_EVOLVE_ARGS=--quick is the CI-sized plumbing check, --fresh starts over.
self-evolve: setup
	PYTHONPATH=$(CURDIR) $(PY) examples/self_evolution/run.py $(SELF_EVOLVE_ARGS)
