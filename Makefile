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

# The fast tier (pyproject's addopts deselect the slow marker); `$(PY) -m pytest -m slow` runs the heavy tier. pytest
# exits 5 when it collected no tests: that fails, and says so.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

# The site in docs/, into site/; --strict fails on any warning (a broken link or anchor, a page not in the nav).
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

# ruff, then the layers contract in .importlinter (a lower layer never imports a higher one).
lint: install
	$(VENV)/bin/ruff check src tests bench docs/hooks && $(VENV)/bin/ruff format --check src tests bench docs/hooks && $(VENV)/bin/lint-imports

.PHONY: install quickstart test lint docs
