# `make quickstart` and `make test` each do the whole setup on a fresh machine (Python 3.11+, Debian/Ubuntu).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 (in [dev]) is the CPU build; on a GPU machine install your CUDA torch first.
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
	./scripts/install-system-deps.sh

quickstart: install
	$(VENV)/bin/mmfuse quickstart

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# ruff, then the layers contract in .importlinter (a lower layer never imports a higher one).
lint: install
	$(VENV)/bin/ruff check src tests bench && $(VENV)/bin/ruff format --check src tests bench && $(VENV)/bin/lint-imports

.PHONY: install quickstart test lint
