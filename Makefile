VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch/torchvision come from the local wheel cache where pip has one (see README).
$(VENV)/.installed: pyproject.toml setup.py evaluation/_scan.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	touch $@

.PHONY: venv test lint demo bench clean
venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check contrastive losses evaluation tests benchmarks examples

test: venv lint
	$(VENV)/bin/python -m pytest -q -n 2 tests

demo: venv
	$(VENV)/bin/contrastive compare --output runs/demo

bench: venv
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/linear_probe.py
	$(PY) benchmarks/embed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
