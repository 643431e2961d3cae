"""Building the frozen base Moshi with moshi's own loaders, from any of three sources.

- ``hf``: a Hugging Face repo id (``kyutai/moshiko-pytorch-bf16``), through moshi's
  ``CheckpointInfo`` (its config.json when present, else Moshi 7B's built-in config);
- ``dir``: a local directory with the same files (``model.safetensors`` + optional
  ``config.json``), for clusters without hub access;
- ``tiny``: random initialisation from ``lm_kwargs``, for tests and the demo.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel

from moshi_ttt.config.schema import ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys of config.json that describe files or generation, not the LMModel constructor.
_NON_LM_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
                "lm_gen_config", "tts_config", "stt_config", "model_id")


#: The ``model`` group's dataclass (``moshi_ttt.config.schema.ModelConfig``): loading reads its
#: source fields (source, repo, path, revision, lm_kwargs, dtype, device, seed).
MoshiSourceConfig = ModelConfig


def _resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _lm_config_from_dir(directory: Path) -> tuple[dict | None, Path]:
    config_path = directory / "config.json"
    lm_config = None
    weights_name = loaders.MOSHI_NAME
    if config_path.exists():
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exn:
            raise ValueError(f"{config_path}: invalid JSON ({exn})") from exn
        weights_name = raw.get("moshi_name", weights_name)
        lm_config = {k: v for k, v in raw.items() if k not in _NON_LM_KEYS}
    weights = directory / weights_name
    if not weights.exists():
        raise FileNotFoundError(f"model.path={directory}: missing weights file {weights.name}")
    return lm_config, weights


def locate_checkpoint(cfg: MoshiSourceConfig) -> tuple[dict | None, Path | None]:
    """(lm_config or None for Moshi 7B's default, weights path or None for random init)."""
    if cfg.source == "tiny":
        if not cfg.lm_kwargs:
            raise ValueError("model.source=tiny needs model.lm_kwargs")
        return dict(cfg.lm_kwargs), None
    if cfg.source == "dir":
        if not cfg.path:
            raise ValueError("model.source=dir needs model.path")
        directory = Path(cfg.path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"model.path={directory} is not a directory")
        return _lm_config_from_dir(directory)
    if cfg.source == "hf":
        if not cfg.repo:
            raise ValueError("model.source=hf needs model.repo (e.g. kyutai/moshiko-pytorch-bf16)")
        try:
            info = loaders.CheckpointInfo.from_hf_repo(cfg.repo, revision=cfg.revision)
        except Exception as exn:  # hub errors are many types; the user needs the repo name
            raise FileNotFoundError(
                f"model.repo={cfg.repo}: could not fetch the checkpoint ({type(exn).__name__}: {exn}). "
                "Offline? Point model.source=dir model.path=... at a local copy."
            ) from exn
        return info.lm_config, Path(info.moshi_weights)
    raise ValueError(f"model.source={cfg.source!r} must be one of hf, dir, tiny")


def lm_kwargs_for(model_cfg: dict) -> dict:
    """The LMModel constructor arguments of ``model``: ``lm_kwargs`` for a tiny model; a local
    directory's ``config.json`` when present; else Moshi 7B's built-in config (what moshi's
    loader uses for a hub repo without config.json), each with ``lm_kwargs`` on top.

    No download and no weights: the planner and config validation size a model with it."""
    source = model_cfg.get("source", "tiny")
    extra = dict(model_cfg.get("lm_kwargs") or {})
    if source == "tiny":
        if not extra:
            raise ValueError("model.source=tiny needs model.lm_kwargs")
        return extra
    if source == "dir" and model_cfg.get("path"):
        config_path = Path(model_cfg["path"]).expanduser() / "config.json"
        if config_path.exists():
            raw = json.loads(config_path.read_text())
            return {**{k: v for k, v in raw.items() if k not in _NON_LM_KEYS}, **extra}
    return {**loaders._lm_kwargs, **extra}


def load_base_moshi(cfg: MoshiSourceConfig) -> LMModel:
    """The base LMModel, weights loaded, every parameter frozen, in eval mode."""
    dtype = _resolve_dtype(cfg.dtype)
    lm_config, weights = locate_checkpoint(cfg)
    if lm_config is not None and cfg.source != "tiny" and cfg.lm_kwargs:
        lm_config = {**lm_config, **cfg.lm_kwargs}
    elif lm_config is None and cfg.lm_kwargs:
        lm_config = {**loaders._lm_kwargs, **cfg.lm_kwargs}
    if weights is None:
        torch.manual_seed(cfg.seed)
    model = loaders.get_moshi_lm(
        str(weights) if weights is not None else None, lm_kwargs=lm_config, device=cfg.device, dtype=dtype
    )
    freeze(model)
    return model


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()


def save_base_checkpoint(model: LMModel, lm_kwargs: dict, directory: str | os.PathLike) -> Path:
    """Write a model in the layout of a hub repo (``model.safetensors`` + ``config.json``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / loaders.MOSHI_NAME))
    (directory / "config.json").write_text(json.dumps({**lm_kwargs, "moshi_name": loaders.MOSHI_NAME}, indent=2))
    return directory


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}
