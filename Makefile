# Quick start:  make train   (set up .venv with what training needs, train the default digits model)
#               make test    (set up .venv with the test extra too, run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# torch from PyPI is a CUDA build on Linux (its NVIDIA libraries weigh ~3 GB); the CPU-only build:
# make train TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
ARGS ?=
# pytest-xdist workers: one per core, at most 4 (each test runs on one torch thread)
WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
# make test-floors: a throwaway virtual environment, deleted afterwards
FLOORS_VENV ?= /tmp/ddpm-floors-venv

.PRECIOUS: $(VENV)/.installed-%
.PHONY: install dev train test test-fast test-floors lint format bench clean

# $(VENV)/.installed-<extra>: torch, then the package (editable) with that extra of pyproject.toml
# ("base": none; "dev": every extra, so it stands for all the others)
$(VENV)/.installed-%: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.$(if $(filter base,$*),,[$*])'
	$(if $(filter dev,$*),touch $(VENV)/.installed-base $(VENV)/.installed-test $(VENV)/.installed-lint)
	touch $@

install: $(VENV)/.installed-base

dev: $(VENV)/.installed-dev

train: $(VENV)/.installed-base
	$(PY) src/train.py $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile $(ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow and not ddp" $(ARGS)

# The fast tests on the lowest torch, torchvision, Lightning, W&B and torch-fidelity that
# pyproject.toml allows (.ci/floors.py reads them there), in a fresh virtual environment.
test-floors:
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS_VENV)/bin/python -m pip install --quiet $$($(PYTHON) .ci/floors.py) -e '.[test]'
	$(FLOORS_VENV)/bin/python -m pip list | grep -iE '^(torch|torchvision|pytorch-lightning|wandb|torch[-_]fidelity|numpy) '
	$(FLOORS_VENV)/bin/python -m pytest -q -n $(WORKERS) --dist loadfile -p no:cacheprovider \
		-m "not slow and not ddp" $(ARGS); status=$$?; rm -rf $(FLOORS_VENV); exit $$status

lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check src tests bench setup.py
	$(VENV)/bin/ruff format --check src tests bench setup.py

format: $(VENV)/.installed-lint
	$(VENV)/bin/ruff format src tests bench setup.py
	$(VENV)/bin/ruff check --fix src tests bench setup.py

bench: $(VENV)/.installed-peers
	$(PY) bench/train_throughput.py
	$(PY) bench/sample_throughput.py
	$(PY) bench/data_throughput.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
