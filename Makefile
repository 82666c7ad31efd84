VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision come from the local wheel cache where pip has one (see README).
$(VENV)/.installed: pyproject.toml setup.py evaluation/_scan.c losses/_native.c losses/_native_body.h losses/_native_sets.h
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	# the reference of the lightly parity tests; its loss modules need only torch and timm (the
	# full install pulls pytorch-lightning and hydra)
	$(PIP) install -q --no-deps 'lightly==1.6.0'
	touch $@

.PHONY: venv test lint demo bench clean gpu-check gpu-wheels mutation
venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check contrastive losses evaluation tests benchmarks examples
	$(VENV)/bin/lint-imports

test: venv lint
	$(VENV)/bin/python -m pytest -q -n 2 tests

demo: venv
	$(VENV)/bin/contrastive compare --output runs/demo

# Break the loss and metric cores on purpose (flipped signs, dropped terms, detached gradients,
# off-by-ones), each in a temporary copy, and report the fraction the tests catch.
mutation: venv
	$(PY) benchmarks/mutation_check.py

bench: venv
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/accuracy_calculator.py
	$(PY) benchmarks/linear_probe.py
	$(PY) benchmarks/embed.py

# On a machine with a CUDA device: the CUDA tests and the GPU benchmarks, written to docs/gpu.md
# (under 8 minutes; without a GPU it says so and exits 0). Runs from the checkout with the
# system python (no venv, no pip install): see benchmarks/gpu_check.py.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

# The wheels a bare GPU machine (Python 3.12, x86_64, no network) lacks, fetched here into
# benchmarks/wheels/ (git-ignored, about 23 MB) to travel with the checkout.
gpu-wheels: venv
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels \
		pytorch-metric-learning faiss-cpu pytest pluggy iniconfig packaging pygments
	$(PIP) download -q --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels \
		pydantic   # with its dependencies: pydantic-core must match it exactly

clean:
	rm -rf $(VENV) runs .pytest_cache
