"""Installing the configured TTT variant (and linear-cost attention) into a built LMModel."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from moshi.models.lm import LMModel
from torch import nn

from moshi_ttt.config.groups import ttt_settings
from moshi_ttt.config.schema import TTTVariantConfig
from moshi_ttt.models.attention import install_local_attention
from moshi_ttt.models.rope import install_position_scale
from moshi_ttt.models.variants import InstallContext, variant_for

logger = logging.getLogger(__name__)


def selected_layers(ttt_cfg: Mapping | TTTVariantConfig | None, num_layers: int) -> list[int]:
    """``ttt.layer_indices`` (negative indices count from the end), default the last
    ``ttt.default_num_layers`` layers."""
    settings = ttt_settings(ttt_cfg or {})
    indices = settings.layer_indices
    if indices is None:
        n = min(num_layers, int(settings.default_num_layers))
        return list(range(num_layers - n, num_layers))
    out = []
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ValueError(f"ttt.layer_indices: {i} is out of range for a model with {num_layers} layers")
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"ttt.layer_indices={list(indices)} names a layer twice")
    return sorted(out)


def student_windows(ttt: TTTVariantConfig, num_layers: int, context: int | None,
                    stage_window: int | None = None) -> dict[str, int | None]:
    """The attention windows of the student's temporal layers, by the setting that gives each
    (None: unbounded), as ``install_ttt`` and a stage's ``configure_for_stage`` set them."""
    out: dict[str, int | None] = {}
    own: set[int] = set()
    variant = variant_for(ttt)
    fixed = variant.attention_window() if variant is not None else None
    if fixed is not None:  # the variant's layers keep their own window (hybrid's W, cache_replacement's lag window)
        own = set(selected_layers(ttt, num_layers))
        out[f"the attention window {ttt.variant} keeps (from ttt.ttt_layer_attention_window)"] = fixed
    if len(own) < num_layers:
        if stage_window is not None:
            out["the stage's attention_window"] = stage_window
        elif ttt.attention_window is not None:
            out["ttt.attention_window"] = int(ttt.attention_window)
        else:
            out["the model's context"] = context
    return out


def install_ttt(model: LMModel, ttt_cfg: Mapping | TTTVariantConfig | None) -> list[nn.Module]:
    """Linear-cost attention everywhere, then the variant in the selected layers. Returns the new
    TTT-bearing modules, one per layer (their parameters are the trainable ones).

    ``ttt_cfg`` is the ``ttt`` section, composed or a plain dict (None: no TTT), read through the
    schema's ``TTTVariantConfig`` (``moshi_ttt.config.groups.ttt_settings``: defaults, types,
    unknown keys, renamed keys). The variant is the registered one of that name
    (``moshi_ttt.models.variants``): its ``install`` puts it into each selected layer."""
    settings = ttt_settings(ttt_cfg if ttt_cfg is not None else {"variant": "none"})
    variant = variant_for(settings)  # a ValueError names the registered variants
    if variant is not None:
        variant.check()
    transformer = model.transformer
    if settings.rope_max_period is not None:
        if transformer.rope is None:
            raise ValueError("ttt.rope_max_period is set but the model has no RoPE")
        transformer.rope.max_period = float(settings.rope_max_period)
    if settings.rope_position_scale not in (None, 1, 1.0):
        install_position_scale(transformer, settings.rope_position_scale)
    chunk, backend = settings.attention_chunk_size, settings.attention_backend
    install_local_attention(model, window=settings.attention_window, chunk_size=chunk, backend=backend)
    if variant is None:
        return []
    norm = getattr(transformer.layers[0].norm1, "__class__", None)
    norm_name = "rms_norm_f32" if norm is not None and "RMS" in norm.__name__ else "layer_norm"
    ctx = InstallContext(dim=model.dim, norm=norm_name, chunk_size=chunk, backend=backend,
                         device=next(model.parameters()).device)
    layers = selected_layers(settings, len(transformer.layers))
    new: list[nn.Module] = []
    for i in layers:
        transformer.layers[i], module = variant.install(transformer.layers[i], f"layer{i}", ctx)
        new.append(module)
    base = {id(p) for p in model.parameters() if not p.requires_grad}
    trainable = sum(p.numel() for m in new for p in m.parameters() if id(p) not in base)
    logger.info("ttt.variant=%s in layers %s: %s new parameters", settings.variant, layers, f"{trainable:,}")
    return new


def set_ttt_enabled(model: nn.Module, enabled: bool) -> int:
    """Switch every TTT branch on or off (the "is TTT used?" check); returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "ttt_enabled"):
            m.ttt_enabled = enabled
            n += 1
    return n
