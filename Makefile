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
# plus a token-level long-range recall set, spoken recall conversations that the demo's long
# stages mix in (48 s, facts recalled 100-300 frames later) and a held-out spoken set that the
# recall callback scores (facts inside, at and beyond the tiny Moshi's 3000-frame window).
$(DEMO_DATA)/dataset.json: $(DATA_SRC) | install
	rm -rf $(DEMO_DATA)
	$(PY) -m moshi_ttt.data.demo_dataset $(DEMO_DATA) --no-progress
	$(PY) -m moshi_ttt.data.recall tokens $(DEMO_DATA)/recall --num-samples 64 \
	  --context-frames 250 --beyond-seconds 10 --card 64 --text-card 64
	$(PY) -m moshi_ttt.data.recall audio $(DEMO_DATA)/recall_train --tokenizer $(DEMO_DATA)/tokenizer.model \
	  --mimi $(DEMO_DATA)/mimi --num-samples 8 --distances 100,200,300 --minutes 0.8 --workers 2 --no-progress \
	  || { rm -f $@; exit 1; }
	$(PY) -m moshi_ttt.data.recall audio $(DEMO_DATA)/recall_heldout --tokenizer $(DEMO_DATA)/tokenizer.model \
	  --mimi $(DEMO_DATA)/mimi --num-samples 2 --seed 1 --distances 250,1500,3000,3500 --workers 2 --no-progress \
	  || { rm -f $@; exit 1; }

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
	$(PY) bench/delta_rule.py
	$(PY) bench/ttt_layer.py
	$(PY) bench/long_sequence.py
	$(PY) bench/data.py
	$(PY) bench/streaming.py
	$(PY) bench/memory_capacity.py

# Every GPU path on one CUDA GPU within --budget-s (480 s): one table, plus outputs/gpu_check/gpu_check.{json,md}.
# On a lent machine with no network: bench/gpu_check_device.sh, with .gpu-wheels from `make gpu-wheels` (README).
gpu-check: install
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# What the lent GPU machine's image lacks (bench/gpu_wheels.txt, pinned, --no-deps) as CPython 3.12 manylinux
# x86_64 wheels, sdists where PyPI has none, in .gpu-wheels/ (ignored; the device call carries it). At most
# 56 MiB, so that it travels with the working tree (64 MiB in all). GPU_WHEELS_PY=3.11
# GPU_WHEELS_DIR=/tmp/w311 makes the same set for another Python (a CPU rehearsal of the install).
GPU_WHEELS_DIR ?= .gpu-wheels
GPU_WHEELS_PY ?= 3.12
GPU_WHEELS_MAX_MIB := 56
.PHONY: gpu-wheels
gpu-wheels:
	@set -euo pipefail; list=bench/gpu_wheels.txt; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	sed '/^[[:space:]]*#/d; /^[[:space:]]*$$/d; s/[[:space:]]*#[[:space:]]*sdist.*$$/ SDIST/; s/[[:space:]]*#.*$$//' $$list > $$tmp/all; \
	grep -v ' SDIST$$' $$tmp/all > $$tmp/wheels || true; grep ' SDIST$$' $$tmp/all | sed 's/ SDIST$$//' > $$tmp/sdists || true; \
	rm -rf $(GPU_WHEELS_DIR); mkdir -p $(GPU_WHEELS_DIR); \
	echo "gpu-wheels: $$(wc -l < $$tmp/wheels) wheels for CPython $(GPU_WHEELS_PY) manylinux x86_64, $$(wc -l < $$tmp/sdists) sdists -> $(GPU_WHEELS_DIR)"; \
	python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version $(GPU_WHEELS_PY) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d $(GPU_WHEELS_DIR) -r $$tmp/wheels \
	  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); \
	if [ -s $$tmp/sdists ]; then python3 -m pip download -q --no-deps --no-binary=:all: -d $(GPU_WHEELS_DIR) -r $$tmp/sdists \
	  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); fi; \
	ls -1 $(GPU_WHEELS_DIR); \
	bytes=$$(du -cb $(GPU_WHEELS_DIR)/* | tail -1 | cut -f1); mib=$$(awk "BEGIN{printf \"%.1f\", $$bytes/1048576}"); \
	echo "gpu-wheels: $$(ls $(GPU_WHEELS_DIR) | wc -l) files, $$mib MiB in $(GPU_WHEELS_DIR) (limit $(GPU_WHEELS_MAX_MIB) MiB)"; \
	if [ $$bytes -gt $$(( $(GPU_WHEELS_MAX_MIB) * 1048576 )) ]; then echo "gpu-wheels: over $(GPU_WHEELS_MAX_MIB) MiB" >&2; exit 1; fi

# docs/configuration.md: every config key and group, rendered from the schema and conf/ (never edit it by hand;
# tests/test_configuration_docs.py fails when it is stale). Needs only the Python deps, not system-deps.
.PHONY: docs
docs: $(MOSHI_TTT_VENV)/.deps-installed
	$(PY) -m moshi_ttt.config.reference

print-python:
	@echo $(PY)
