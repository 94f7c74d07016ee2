# Quick start:  make train   (set up .venv, train the default digits model on the CPU)
#               make test    (set up .venv, run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,sweep
ARGS ?=
# pytest-xdist workers: one per core, at most 4 (each test runs on one torch thread)
WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")

.PHONY: install train test test-fast lint format bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed-$(EXTRAS)

train: install
	$(PY) src/train.py $(ARGS)

test: install
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile $(ARGS)

test-fast: install
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow and not ddp" $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench:
	$(MAKE) install EXTRAS=test,sweep,bench
	$(PY) bench/train_throughput.py
	$(PY) bench/sample_throughput.py
	$(PY) bench/data_throughput.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
