# One virtual environment per version of pyproject.toml, kept outside the clone so that
# CI and later clones reuse it. Override with MOSHI_TTT_VENV=/path/to/venv.
SHELL := /bin/bash
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-12)
MOSHI_TTT_VENV ?= $(HOME)/.cache/moshi-ttt/venv-$(PYPROJECT_HASH)
PY := $(MOSHI_TTT_VENV)/bin/python
export NO_TORCH_COMPILE ?= 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1
# This clone's sources win over whatever checkout the shared venv's editable install points to.
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: install demo test lint bench print-python

# Dependencies are installed once per pyproject hash. The editable link (for `python train.py`
# outside make) is re-pointed only when the checkout it points to is gone, so a second clone
# never steals it from a live one; make targets use PYTHONPATH above either way.
install: $(MOSHI_TTT_VENV)/.deps-installed
	@if [ ! -d "$$(cat $(MOSHI_TTT_VENV)/.source-dir 2>/dev/null)/src/moshi_ttt" ]; then \
	  $(PY) -m pip install -q --no-deps --no-build-isolation -e . && echo "$(CURDIR)" > $(MOSHI_TTT_VENV)/.source-dir; \
	fi

$(MOSHI_TTT_VENV)/.deps-installed: pyproject.toml
	@mkdir -p $(dir $(MOSHI_TTT_VENV))
	@[ -x $(PY) ] || python3 -m venv $(MOSHI_TTT_VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	@echo "$(CURDIR)" > $(MOSHI_TTT_VENV)/.source-dir
	@touch $@

demo: install
	$(PY) train.py experiment=demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check src tests bench train.py

bench: install
	$(PY) bench/ttt_layer.py
	$(PY) bench/long_sequence.py

print-python:
	@echo $(PY)
