"""Assembling the trainable model: frozen base Moshi + the configured adapters."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from moshi.models.lm import LMModel

from moshi_ttt.models.loading import MoshiSourceConfig, load_base_moshi
from moshi_ttt.models.lora import apply_lora

logger = logging.getLogger(__name__)

_SOURCE_KEYS = ("source", "repo", "path", "revision", "lm_kwargs", "dtype", "device", "seed")


def source_config(model_cfg: Mapping) -> MoshiSourceConfig:
    return MoshiSourceConfig(**{k: model_cfg[k] for k in _SOURCE_KEYS if k in model_cfg})


def build_model(model_cfg: Mapping, ttt_cfg: Mapping | None = None) -> LMModel:
    """The base from its source with every base weight frozen, then LoRA and TTT on top."""
    model = load_base_moshi(source_config(model_cfg))
    lora = model_cfg.get("lora") or {}
    n = apply_lora(model, int(lora.get("rank", 0)), float(lora.get("scaling", 2.0)),
                   str(lora.get("modules", "transformer")))
    if n:
        logger.info("LoRA rank %d on %d linear layers", int(lora["rank"]), n)
    variant = (ttt_cfg or {}).get("variant", "none")
    if variant != "none":
        raise ValueError(f"ttt.variant={variant!r} is not available in this build (only 'none')")
    if model_cfg.get("gradient_checkpointing"):
        model.transformer.checkpointing = True
    return model
