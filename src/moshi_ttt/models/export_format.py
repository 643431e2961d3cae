"""The export directory's format: file names, ``config.json``'s layout, reading the weights back.

Kept below ``export`` (which writes it from a checkpoint), ``models.build`` (which loads it) and
``serving`` (which finds it), so none of them imports another floor's module to share it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moshi_ttt.config.groups import ttt_dict

FORMAT = "moshi-ttt-export/2"
CONFIG_NAME = "config.json"
TTT_NAME = "ttt.safetensors"
LORA_NAME = "lora.safetensors"
TOKENIZER_NAME = "tokenizer.model"  # when the tokenizer is a local file (Mimi's names: data.codec)
LEGACY_WEIGHTS_NAME = "ttt_weights.safetensors"  # format 1: every trained tensor in one file
# What a hub copy of an export needs (nothing else of the repo is downloaded).
FILE_PATTERNS = [CONFIG_NAME, "*.safetensors", "*.model", "*.json"]
_LORA_MARKERS = (".lora_A.", ".lora_B.")
# Keys of a moshi config.json that are not LMModel constructor settings.
NON_LM_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
               "lm_gen_config", "tts_config", "stt_config", "model_id", "lora", "lora_rank", "lora_scaling")

# The TTT wrapper keeps moshi's layer as its child ``layer``: moshi's own name drops that step.
_WRAPPER_CHILD = ".layer."


def is_lora_key(name: str) -> bool:
    return any(m in name for m in _LORA_MARKERS)


def wrapped_prefixes(state_keys) -> set[str]:
    """``transformer.layers.N`` prefixes whose moshi layer sits under a TTT wrapper (``.layer.``)."""
    prefixes = set()
    for k in state_keys:
        if not is_lora_key(k) and k.startswith("transformer.layers.") and ".ttt." in k:
            prefixes.add(".".join(k.split(".")[:3]))
    return prefixes


def lora_to_moshi_names(state: dict, wrapped: set[str]) -> dict:
    """Our LoRA keys -> moshi's module names (a wrapped layer's ``.layer.`` step removed)."""
    out = {}
    for k, v in state.items():
        prefix = ".".join(k.split(".")[:3])
        if prefix in wrapped and k.startswith(prefix + _WRAPPER_CHILD):
            k = prefix + "." + k[len(prefix + _WRAPPER_CHILD):]
        out[k] = v
    return out


def lora_from_moshi_names(state: dict, model_keys: set[str]) -> dict:
    """moshi's LoRA names -> this model's (re-inserting a wrapper's ``.layer.`` where the model has it)."""
    out = {}
    for k, v in state.items():
        if k not in model_keys:
            parts = k.split(".")
            alt = ".".join(parts[:3] + ["layer"] + parts[3:])
            if alt in model_keys:
                k = alt
        out[k] = v
    return out


def write_weights(out_dir: Path, state: dict) -> tuple[dict, dict]:
    """Write ``state`` as the TTT and LoRA files (stale ones removed); returns (ttt, lora) tensors."""
    lora = {k: v for k, v in state.items() if is_lora_key(k)}
    ttt = {k: v for k, v in state.items() if not is_lora_key(k)}
    for stale in (TTT_NAME, LORA_NAME, LEGACY_WEIGHTS_NAME):
        (out_dir / stale).unlink(missing_ok=True)
    if ttt:
        save_file(ttt, str(out_dir / TTT_NAME))
    if lora:
        save_file(lora_to_moshi_names(lora, wrapped_prefixes(state)), str(out_dir / LORA_NAME))
    return ttt, lora


def config_json(state: dict, model_cfg: dict, ttt_cfg: dict, lm_config: dict, base_config_complete: bool,
                codec_entries: dict, codec: dict, source_checkpoint: str) -> dict:
    """``config.json``: moshi's layout at the top level, ours under ``moshi_ttt``."""
    lora = any(is_lora_key(k) for k in state)
    ttt = any(not is_lora_key(k) for k in state)
    lora_cfg = dict(model_cfg.get("lora") or {})
    return {
        **lm_config,
        "model_type": "moshi",
        "lora": lora,
        **({"lora_rank": int(lora_cfg.get("rank", 0)), "lora_scaling": float(lora_cfg.get("scaling", 2.0)),
            "lora_name": LORA_NAME} if lora else {}),
        **codec_entries,
        "moshi_ttt": {
            "format": FORMAT,
            "model": {**model_cfg, "gradient_checkpointing": False},
            "ttt": ttt_cfg,
            "ttt_name": TTT_NAME if ttt else None,
            "lora_modules": lora_cfg.get("modules", "transformer") if lora else None,
            "codec": codec or None,
            "base_config_complete": base_config_complete,
            "source_checkpoint": source_checkpoint,
            "num_tensors": len(state),
            "num_parameters": int(sum(v.numel() for v in state.values())),
        },
    }


def write_config(out_dir: Path, meta: dict) -> None:
    (out_dir / CONFIG_NAME).write_text(json.dumps(meta, indent=2))


def read_export(directory: str | Path) -> dict:
    """An export's settings as ``{model, ttt, codec, ...}`` (format 2, or format 1 of older exports)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise ValueError(f"{path}: unreadable ({exn})") from exn
    if "moshi_ttt" in raw:
        meta = dict(raw["moshi_ttt"])
        meta["lm_gen_config"] = raw.get("lm_gen_config") or {}
        meta["lora_name"] = raw.get("lora_name")
        if raw.get("mimi_name") and raw.get("tokenizer_name") and not meta.get("codec"):
            meta["codec"] = {"mimi": str(directory), "tokenizer": str(directory)}
        elif meta.get("codec"):
            meta["codec"] = {k: str(directory) if v == "." else v for k, v in meta["codec"].items()}
    elif "model" in raw and (directory / LEGACY_WEIGHTS_NAME).exists():
        meta = {**raw, "ttt": raw.get("ttt") or {"variant": "none"}, "codec": None, "legacy": True}
    else:
        raise ValueError(f"{path}: not a moshi-ttt export (no 'moshi_ttt' section); a plain moshi checkpoint "
                         "directory is a base model: use it as model.source=dir")
    if "model" not in meta:
        raise ValueError(f"{path}: moshi_ttt.model is missing")
    meta["ttt"] = ttt_dict(meta["ttt"], f"{path}: ttt")  # an older export's key names, moved with a warning
    return meta


def load_export_weights(directory: str | Path, meta: dict, model_keys: set[str], device: str = "cpu") -> dict:
    """Every trained tensor of an export, keyed by this model's parameter names."""
    directory = Path(directory)
    if meta.get("legacy"):
        return load_file(str(directory / LEGACY_WEIGHTS_NAME), device=device)
    state: dict[str, torch.Tensor] = {}
    if meta.get("ttt_name"):
        state.update(load_file(str(directory / meta["ttt_name"]), device=device))
    if meta.get("lora_name"):
        state.update(lora_from_moshi_names(load_file(str(directory / meta["lora_name"]), device=device), model_keys))
    return state
