"""RoPE: which positions and relative distances a conversation of T frames reaches, against the
context the base model was trained with and RoPE's ``max_period``.

Moshi's RoPE rotates dimension pair i by ``position * max_period ** (-2i / D)`` (D = head dim), so
pair i has a wavelength of ``2 pi max_period ** (2i / D)`` frames. Attention scores depend only on
the relative distance between a query and a key, and that distance never exceeds the layer's
attention window minus one, however long the conversation. A pair whose wavelength exceeds the
trained context never completed a full turn in training: at distances beyond that context it
rotates to angles the model has never seen (the extrapolation failure the lab notes suspected).
Absolute positions grow with the conversation; they stay exact integers in fp32 below 2**24.
"""

from __future__ import annotations

import math

import numpy as np

from moshi_ttt.diagnostics.findings import CheckResult, seconds
from moshi_ttt.diagnostics.layout import ModelLayout

FP32_EXACT = 2**24


def rope_wavelengths(head_dim: int, max_period: float) -> np.ndarray:
    """Wavelength (frames) of every rotated pair of a head of width ``head_dim``, shortest first."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim}")
    i = np.arange(head_dim // 2, dtype=np.float64)
    return 2 * math.pi * max_period ** (2 * i / head_dim)


def coverage(wavelengths: np.ndarray, max_distance: int, trained_context: int | None) -> dict:
    """Shares of the RoPE pairs by wavelength against the largest distance and the trained context."""
    trained = trained_context if trained_context is not None else max_distance + 1
    beyond = max_distance > trained - 1
    return {
        "share_wavelength_gt_max_distance": float((wavelengths > max_distance).mean()),
        "share_wavelength_gt_trained_context": float((wavelengths > trained).mean()),
        # pairs that had not completed a turn in training and are driven further at these distances
        "share_unseen_angles": float((wavelengths > trained).mean()) if beyond else 0.0,
    }


def check_rope(layout: ModelLayout, frames: int, trained_context: int | None = None) -> CheckResult:
    """RoPE reach of a ``frames``-long conversation. ``trained_context`` (frames) defaults to each
    layer's configured context (moshi's ``context``, 3000 frames for Moshi 7B)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    res = CheckResult("rope")
    if layout.rope_max_period is None:
        res.metrics = {"rope": False, "positional_embedding": layout.positional_embedding}
        res.add("ok", f"no RoPE in the temporal transformer (positional_embedding={layout.positional_embedding})")
        return res
    max_period = layout.rope_max_period
    scale = layout.rope_position_scale
    attn_layers = [lay for lay in layout.layers if lay.kind != "no_attention"]
    head_dim = attn_layers[0].head_dim if attn_layers else layout.dim
    wl = rope_wavelengths(head_dim, max_period)
    max_pos = frames - 1
    per_layer = {}
    for lay in attn_layers:
        trained = trained_context if trained_context is not None else lay.trained_context
        reach = frames if lay.window is None else min(frames, lay.window)
        d_max = (reach - 1) / scale  # in trained-position units: interpolation divides positions by scale
        d_max = int(d_max) if float(d_max).is_integer() else d_max
        cov = coverage(rope_wavelengths(lay.head_dim, max_period), d_max, trained)
        per_layer[lay.name] = {"kind": lay.kind, "window": lay.window, "trained_context": trained,
                               "max_relative_distance": d_max,
                               "exceeds_trained_context": trained is not None and d_max > trained - 1, **cov}
        if per_layer[lay.name]["exceeds_trained_context"]:
            res.add("warn", f"{lay.name}: relative distances up to {seconds(d_max)} exceed the trained context of "
                    f"{seconds(trained)} (attention window {'unbounded' if lay.window is None else lay.window}): "
                    f"{cov['share_unseen_angles']:.0%} of the RoPE frequencies (wavelength > {trained} frames) "
                    "rotate to angles never seen in training", lay.name)
    d_all = max((v["max_relative_distance"] for v in per_layer.values()), default=0)
    trained_all = trained_context if trained_context is not None else max(
        (lay.trained_context for lay in attn_layers if lay.trained_context is not None), default=None)
    spacing = float(np.spacing(np.float32(max(max_pos, 1))))
    res.metrics = {
        "rope": True, "max_period": max_period, "position_scale": scale, "head_dim": head_dim, "num_frequencies": int(wl.size),
        "min_wavelength_frames": float(wl[0]), "max_wavelength_frames": float(wl[-1]),
        "frames": frames, "max_absolute_position": max_pos, "positions_exact_fp32": max_pos < FP32_EXACT,
        # rounding of the fastest pair's angle (1 rad per frame) at the last position, in fp32
        "max_angle_rounding_rad": spacing / 2,
        "trained_context": trained_all, "max_relative_distance": d_all,
        **coverage(wl, d_all, trained_all), "layers": per_layer,
    }
    res.series = {"wavelength_frames": wl.tolist()}
    if not res.findings and attn_layers:
        res.add("ok", f"RoPE: relative distances stay <= {seconds(d_all)}, within the trained context "
                f"({trained_all} frames): windowed attention never extrapolates RoPE, however long the conversation")
    if d_all > wl[-1]:
        res.add("warn", f"rope.max_period={max_period:g}: relative distances up to {d_all} frames exceed the longest "
                f"RoPE wavelength ({wl[-1]:.0f} frames): distant positions alias onto near ones", "rope.max_period")
    if max_pos >= FP32_EXACT:
        res.add("warn", f"absolute position {max_pos} is past 2**24: fp32 RoPE positions are no longer exact "
                f"(angle rounding up to {spacing / 2:.2g} rad)", "positions")
    else:
        res.add("ok", f"absolute positions up to {max_pos} are exact in fp32 (fastest-pair angle rounding "
                f"<= {spacing / 2:.2g} rad); max_period={max_period:g}, longest wavelength {wl[-1]:.0f} frames",
                "positions")
    return res
