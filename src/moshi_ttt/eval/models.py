"""Models to evaluate, named on the command line as ``NAME=SPEC``:

- ``NAME=EXPORT_DIR``: a directory written by ``python -m moshi_ttt.export`` (TTT/LoRA weights +
  config.json), rebuilt on its recorded base (``base_override`` replaces the base's source);
- ``NAME=base:MODEL_YAML``: a frozen base Moshi from a model config (``conf/model/*.yaml``, or
  any YAML with a ``model:`` section such as a run's config.yaml), no TTT;
- ``NAME=run:RUN_DIR``: a training run's last checkpoint (``RUN_DIR/checkpoints/last.ckpt``)
  with the run's own config.yaml, without exporting it first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


def parse_model_spec(spec: str) -> tuple[str, str, str]:
    """``NAME=SPEC`` -> (name, kind, path) with kind in export | base | run."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model {spec!r}: expected NAME=EXPORT_DIR, NAME=base:MODEL_YAML or NAME=run:RUN_DIR")
    for kind in ("base", "run"):
        if rest.startswith(kind + ":"):
            path = rest[len(kind) + 1 :]
            break
    else:
        kind, path = "export", rest
    if not Path(path).exists():
        raise FileNotFoundError(f"--model {spec!r}: {path} does not exist")
    if kind == "export" and not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"--model {spec!r}: {path} has no config.json (not an export directory; "
                                "use base:MODEL_YAML or run:RUN_DIR)")
    if kind == "run" and not (Path(path) / "config.yaml").exists():
        raise FileNotFoundError(f"--model {spec!r}: {path} has no config.yaml (not a run directory)")
    return name, kind, path


def _model_section(path: str) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    cfg = cfg.get("model", cfg)
    if "source" not in cfg:
        raise ValueError(f"{path}: no model.source (expected a conf/model/*.yaml or a run's config.yaml)")
    return cfg


def load_model(kind: str, path: str, base_override: dict | None = None, device: str | None = None):
    """An eval-mode LMModel for one parsed spec (every parameter frozen)."""
    from moshi_ttt.models import build_model, load_exported
    from moshi_ttt.models.build import load_trained_weights

    if kind == "export":
        return load_exported(path, base=base_override, device=device)
    if kind == "base":
        model_cfg = {**_model_section(path), **(base_override or {})}
        if device is not None:
            model_cfg["device"] = device
        model = build_model(model_cfg, {"variant": "none"})
    elif kind == "run":
        from moshi_ttt.export import trained_state_dict

        run_cfg = yaml.safe_load((Path(path) / "config.yaml").read_text())
        model_cfg = {**run_cfg["model"], **(base_override or {})}
        if device is not None:
            model_cfg["device"] = device
        model = build_model(model_cfg, run_cfg.get("ttt") or {"variant": "none"})
        ckpt = Path(path) / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise FileNotFoundError(f"run {path}: no checkpoints/last.ckpt")
        load_trained_weights(model, trained_state_dict(ckpt), ckpt)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


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
