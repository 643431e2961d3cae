"""Models to evaluate, named on the command line as ``NAME=SPEC``:

- ``NAME=MODEL``: what serve and infer take (``moshi_ttt.serving.model``): an export directory
  written by ``python -m moshi_ttt.export``, a hub repo id holding one, a run directory or a
  checkpoint; rebuilt on its recorded base (``base_override`` replaces the base's source);
- ``NAME=base:MODEL_YAML``: a frozen base Moshi from a model config (``conf/model/*.yaml``, or
  any YAML with a ``model:`` section such as a run's config.yaml), no TTT;
- ``NAME=run:RUN_DIR``: a training run's last checkpoint (``RUN_DIR/checkpoints/last.ckpt``),
  without exporting it first (the same as ``NAME=RUN_DIR``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, str, str]:
    """``NAME=SPEC`` -> (name, kind, path) with kind in export | hub | run | checkpoint | base."""
    from moshi_ttt.serving.model import resolve

    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model {spec!r}: expected NAME=MODEL (export dir, run dir, checkpoint or hub repo id), "
                         "NAME=base:MODEL_YAML or NAME=run:RUN_DIR")
    if rest.startswith("base:"):
        path = rest[len("base:"):]
        if not Path(path).exists():
            raise FileNotFoundError(f"--model {spec!r}: {path} does not exist")
        return name, "base", path
    if rest.startswith("run:"):
        path = rest[len("run:"):]
        if not Path(path).exists():
            raise FileNotFoundError(f"--model {spec!r}: {path} does not exist")
        if not (Path(path) / "checkpoints").is_dir() and not (Path(path) / "config.yaml").exists():
            raise FileNotFoundError(f"--model {spec!r}: {path} has no checkpoints/ or config.yaml (not a run directory)")
        return name, "run", path
    try:
        ref = resolve(rest)
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"--model {spec!r}: {exn}") from exn
    return name, ref.kind, ref.path


def _model_section(path: str) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    cfg = cfg.get("model", cfg)
    if "source" not in cfg:
        raise ValueError(f"{path}: no model.source (expected a conf/model/*.yaml or a run's config.yaml)")
    return cfg


def load_model(kind: str, path: str, base_override: dict | None = None, device: str | None = None):
    """An eval-mode LMModel for one parsed spec (every parameter frozen); trained models are rebuilt
    from the config their checkpoint or export carries (``moshi_ttt.serving.model``)."""
    from moshi_ttt.models import build_model
    from moshi_ttt.serving.model import ModelRef, build_lm, read_source

    if kind == "base":
        model_cfg = {**_model_section(path), **(base_override or {})}
        if device is not None:
            model_cfg["device"] = device
        model = build_model(model_cfg, {"variant": "none"})
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()
    if kind not in ("export", "hub", "run", "checkpoint"):
        raise ValueError(f"unknown model kind {kind!r}")
    return build_lm(read_source(ModelRef(kind, path, path)), base_override, device)


def codec_of(kind: str, path: str):
    """The Mimi/tokenizer sources a parsed spec was trained with, or None when they cannot be told."""
    from moshi_ttt.serving.codec import codec_sources
    from moshi_ttt.serving.model import ModelRef, read_source

    if kind == "base":
        try:
            return codec_sources({"model": _model_section(path)})
        except ValueError:
            return None
    return read_source(ModelRef(kind, path, path)).codec


def parse_model_specs(specs: list[str]) -> list[tuple[str, str, str]]:
    """Every ``NAME=SPEC`` checked (paths exist, names unique) before any model is built."""
    parsed = [parse_model_spec(s) for s in specs]
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return parsed


def iter_models(specs: list[str], base_override: dict | None = None, device: str | None = None):
    """(name, model) one at a time, each released before the next is built (five 7B variants
    do not fit in one GPU together)."""
    import gc

    for name, kind, path in parse_model_specs(specs):
        logger.info("loading %s (%s %s)", name, kind, path)
        model = load_model(kind, path, base_override, device)
        yield name, model
        del model
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_models(specs: list[str], base_override: dict | None = None, device: str | None = None) -> dict:
    """{name: model} for ``NAME=SPEC`` strings, all in memory at once (for the function API)."""
    return {name: load_model(kind, path, base_override, device) for name, kind, path in parse_model_specs(specs)}
