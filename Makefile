# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv first. torch is pinned before anything else so pip takes the CPU build that
# lies on disk instead of pulling a multi-GB CUDA build as a dependency of diffusers.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: test demo
test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/patchforge demo
