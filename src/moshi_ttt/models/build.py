"""Assembling the trainable model: frozen base Moshi + the configured adapters."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from moshi.models.lm import LMModel

from moshi_ttt.config.groups import model_settings
from moshi_ttt.config.schema import ModelConfig, TTTVariantConfig
from moshi_ttt.models.insert import install_ttt
from moshi_ttt.models.loading import load_base_moshi
from moshi_ttt.models.lora import apply_lora

logger = logging.getLogger(__name__)


def source_config(model_cfg: Mapping | ModelConfig) -> ModelConfig:
    """The ``model`` section (composed or a plain dict) checked against the schema's ``ModelConfig``."""
    return model_settings(model_cfg)


def build_model(model_cfg: Mapping | ModelConfig, ttt_cfg: Mapping | TTTVariantConfig | None = None) -> LMModel:
    """The base from its source with every base weight frozen, then LoRA, linear-cost attention
    and the TTT variant on top (only LoRA and TTT parameters require gradients).

    Both configs are read through the schema's dataclasses (``moshi_ttt.config.groups``): a plain
    dict from a checkpoint, an export or a test gets the same defaults, checks and renames."""
    settings = model_settings(model_cfg)
    model = load_base_moshi(settings)
    lora = settings.lora
    n = apply_lora(model, int(lora.rank), float(lora.scaling), str(lora.modules))
    if n:
        logger.info("LoRA rank %d on %d linear layers", int(lora.rank), n)
    install_ttt(model, ttt_cfg)
    if settings.train_base:
        # Pretraining a (tiny) base from scratch, e.g. for the memory experiment: everything trains.
        for p in model.parameters():
            p.requires_grad_(True)
    if settings.gradient_checkpointing:
        model.transformer.checkpointing = True
        if model.depformer is not None:  # at 30 min the depformer's activations dominate memory
            model.depformer.checkpointing = True
    return model


def load_exported(export_dir, base: Mapping | None = None, device: str | None = None,
                  dtype: str | None = None) -> LMModel:
    """The full model for inference (LMGen) from the base checkpoint plus an export directory.

    ``base`` overrides the recorded base-model source (e.g. ``{"source": "dir", "path": ...}``
    on a machine where the hub is not reachable)."""
    from pathlib import Path

    from moshi_ttt.models.export_format import load_export_weights, read_export

    export_dir = Path(export_dir)
    meta = read_export(export_dir)
    model_cfg = {**meta["model"], **(base or {}), "gradient_checkpointing": False}
    if device is not None:
        model_cfg["device"] = device
    if dtype is not None:
        model_cfg["dtype"] = dtype
    model = build_model(model_cfg, meta["ttt"])
    keys = {n for n, _ in model.named_parameters()}
    state = load_export_weights(export_dir, meta, keys, device=model_cfg.get("device", "cpu"))
    load_trained_weights(model, state, export_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_trained_weights(model: LMModel, state: Mapping, source) -> None:
    """Load the trained (TTT / LoRA) weights into a freshly built model; ``state`` must hold
    exactly its trainable parameters (an error names ``source`` and the first mismatches)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(f"{source}: weights do not match the configured adapters (missing "
                         f"{sorted(trainable - set(state))[:3]}, unexpected {sorted(set(state) - trainable)[:3]})")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
