"""Installing the configured TTT variant (and linear-cost attention) into a built LMModel."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

from moshi.models.lm import LMModel
from torch import nn

from moshi_ttt.models.attention import LocalStreamingAttention, install_local_attention
from moshi_ttt.models.cache_replacement import CacheReplacementAttention
from moshi_ttt.models.rope import install_position_scale
from moshi_ttt.models.variants import PLACEMENTS, VARIANTS, TTTWrappedLayer
from moshi_ttt.ttt import TTTConfig

logger = logging.getLogger(__name__)

_KEYS = {"variant", "layers", "layer", "window", "memory_read", "memory_slots", "hybrid_alpha_init", "attention_window",
         "attention_chunk_size", "attention_backend", "rope_max_period", "rope_position_scale",
         "default_num_layers"}


def selected_layers(ttt_cfg: Mapping, num_layers: int) -> list[int]:
    """``ttt.layers`` (negative indices count from the end), default the last few layers."""
    layers = ttt_cfg.get("layers")
    if layers is None:
        n = min(num_layers, int(ttt_cfg.get("default_num_layers", 3)))
        return list(range(num_layers - n, num_layers))
    out = []
    for i in layers:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"ttt.layers: {i} is out of range for a model with {num_layers} layers")
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"ttt.layers={list(layers)} names a layer twice")
    return sorted(out)


def install_ttt(model: LMModel, ttt_cfg: Mapping | None) -> list[nn.Module]:
    """Linear-cost attention everywhere, then the variant in the selected layers. Returns the new
    TTT-bearing modules (their parameters are the trainable ones)."""
    ttt_cfg = dict(ttt_cfg or {"variant": "none"})
    unknown = set(ttt_cfg) - _KEYS
    if unknown:
        raise ValueError(f"ttt: unknown key(s) {sorted(unknown)}")
    if ttt_cfg.pop("hybrid_alpha_init", None) is not None:
        warnings.warn("ttt.hybrid_alpha_init is deprecated and ignored: hybrid now keeps attention at full "
                      "strength and adds the gated TTT read (step 0 is the frozen model)", DeprecationWarning,
                      stacklevel=2)
    variant = ttt_cfg.get("variant", "none")
    if variant not in VARIANTS:
        raise ValueError(f"ttt.variant={variant!r} must be one of {VARIANTS}")
    transformer = model.transformer
    if ttt_cfg.get("rope_max_period") is not None:
        if transformer.rope is None:
            raise ValueError("ttt.rope_max_period is set but the model has no RoPE")
        transformer.rope.max_period = float(ttt_cfg["rope_max_period"])
    if ttt_cfg.get("rope_position_scale") not in (None, 1, 1.0):
        install_position_scale(transformer, ttt_cfg["rope_position_scale"])
    chunk, backend = ttt_cfg.get("attention_chunk_size"), ttt_cfg.get("attention_backend", "sdpa")
    install_local_attention(model, window=ttt_cfg.get("attention_window"), chunk_size=chunk, backend=backend)
    if variant == "none":
        return []
    layer_cfg = TTTConfig(**dict(ttt_cfg.get("layer") or {}))
    dim = model.dim
    norm = getattr(transformer.layers[0].norm1, "__class__", None)
    norm_name = "rms_norm_f32" if norm is not None and "RMS" in norm.__name__ else "layer_norm"
    device = next(model.parameters()).device
    new: list[nn.Module] = []
    for i in selected_layers(ttt_cfg, len(transformer.layers)):
        name = f"layer{i}"
        layer = transformer.layers[i]
        if variant in PLACEMENTS:
            if variant == "hybrid":
                LocalStreamingAttention.from_moshi(layer.self_attn, int(ttt_cfg.get("window", 256)), chunk, backend)
                layer.self_attn.fixed_window = True
            wrapped = TTTWrappedLayer(layer, variant, layer_cfg, dim, name, norm=norm_name).to(device)
            transformer.layers[i] = wrapped
            new.append(wrapped)
        else:
            attn = CacheReplacementAttention.from_moshi_with_memory(
                layer.self_attn, int(ttt_cfg.get("window", 256)), layer_cfg, name,
                memory_read=ttt_cfg.get("memory_read", "add"), chunk_size=chunk, backend=backend,
                memory_slots=ttt_cfg.get("memory_slots"))
            new.append(attn)
    base = {id(p) for p in model.parameters() if not p.requires_grad}
    trainable = sum(p.numel() for m in new for p in m.parameters() if id(p) not in base)
    logger.info("ttt.variant=%s in layers %s: %s new parameters", variant,
                selected_layers(ttt_cfg, len(transformer.layers)), f"{trainable:,}")
    return new


def set_ttt_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every TTT branch on or off (the "is TTT used?" check); returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "ttt_enabled"):
            m.ttt_enabled = enabled
            n += 1
    return n
