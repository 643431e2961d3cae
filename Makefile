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

.PHONY: install system-deps demo demo-data memory-proof test lint bench gpu-check print-python

# Dependencies are installed once per pyproject hash. The editable link (for `python train.py`
# outside make) is re-pointed only when the checkout it points to is gone, so a second clone
# never steals it from a live one; make targets use PYTHONPATH above either way.
install: system-deps $(MOSHI_TTT_VENV)/.deps-installed
	@if [ ! -d "$$(cat $(MOSHI_TTT_VENV)/.source-dir 2>/dev/null)/src/moshi_ttt" ]; then \
	  $(PY) -m pip install -q --no-deps --no-build-isolation -e . && echo "$(CURDIR)" > $(MOSHI_TTT_VENV)/.source-dir; \
	fi

# Keyed by the hash of pyproject.toml (in the venv path), not by its mtime: a fresh clone's
# newer pyproject.toml must not trigger a reinstall into the shared venv.
$(MOSHI_TTT_VENV)/.deps-installed:
	@mkdir -p $(dir $(MOSHI_TTT_VENV))
	@[ -x $(PY) ] || python3 -m venv $(MOSHI_TTT_VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[dev]"
	@echo "$(CURDIR)" > $(MOSHI_TTT_VENV)/.source-dir
	@touch $@

# Debian packages, installed when missing: espeak-ng speaks the embedded demo dialogues;
# slurm-wlm and munge run the real single-node Slurm cluster of tests/test_slurm.py.
SYSTEM_PACKAGES := espeak-ng:espeak-ng slurm-wlm:slurmctld munge:munged
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair#*:} >/dev/null 2>&1 || [ -x /usr/sbin/$${pair#*:} ] || missing="$$missing $${pair%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt-get:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

DEMO_DATA := data/generated/demo
DATA_SRC := $(addprefix src/moshi_ttt/data/,audio.py alignment.py codec.py prepare.py dialogue.py espeak.py \
	demo_dataset.py recall.py shards.py)

demo-data: $(DEMO_DATA)/dataset.json

# The embedded default dataset: espeak-ng dialogues -> tiny Mimi + tiny tokenizer -> shards,
# plus a token-level long-range recall set (~40 s on 2 cores).
$(DEMO_DATA)/dataset.json: $(DATA_SRC) | install
	rm -rf $(DEMO_DATA)
	$(PY) -m moshi_ttt.data.demo_dataset $(DEMO_DATA) --no-progress
	$(PY) -m moshi_ttt.data.recall tokens $(DEMO_DATA)/recall --num-samples 64 \
	  --context-frames 250 --beyond-seconds 10 --card 64 --text-card 64

demo: install demo-data
	$(PY) train.py experiment=demo

# The headline experiment: can each TTT variant recall a fact beyond the attention window?
memory-proof: install
	$(PY) -m moshi_ttt.memory_proof --out outputs/memory_proof

test: install
	$(PY) -m pytest -q -rs tests

lint: install
	$(PY) -m ruff check src tests bench train.py

bench: install
	$(PY) bench/ttt_layer.py
	$(PY) bench/long_sequence.py
	$(PY) bench/data.py
	$(PY) bench/streaming.py
	$(PY) bench/memory_capacity.py

# Every GPU path on one CUDA GPU (< 8 min on an H200): one table, plus outputs/gpu_check/gpu_check.{json,md}.
gpu-check: install
	$(PY) bench/gpu_check.py

print-python:
	@echo $(PY)
