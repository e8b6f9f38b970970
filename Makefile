# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (lint, then the suite).
# Both create .venv from the tested versions in constraints.txt, torch first, so pip takes the CPU
# build that lies on disk instead of pulling a multi-GB CUDA build as a dependency of diffusers.
#   make test-fast    the suite without the slow toy-model tests (a developer's loop)
#   make lint         ruff over the package, tests and benchmarks
#   make test-latest  the suite against the newest releases, without the lock (upstream drift check)
VENV ?= .venv
PY := $(VENV)/bin/python
LATEST ?= .venv-latest
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: test test-fast lint demo test-latest
test: $(VENV)/.installed
	$(PY) -m ruff check patchforge tests benchmarks
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff check patchforge tests benchmarks

demo: $(VENV)/.installed
	$(VENV)/bin/patchforge demo

# Newest releases of everything but torch (kept on the CPU build that lies on disk). Not part of CI:
# a red run here means upstream moved; see docs/install.md for refreshing constraints.txt.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --upgrade -e '.[test]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/freeze.txt
	$(LATEST)/bin/python -m pytest
