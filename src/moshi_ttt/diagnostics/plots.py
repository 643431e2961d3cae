"""PNG figures of a diagnostics report, drawn from the plain dicts of ``report.json`` (so a
notebook can redraw them from the file); matplotlib Figures without pyplot, as ``moshi_ttt.eval.plots``."""

from __future__ import annotations

import math

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.eval.plots import _figure, _finish

# Layer kind -> colour in the context plot; a variant not named here is grey.
KIND_COLORS = {"attention": "#d62728", "pre_attention": "#2ca02c", "post_attention": "#ff7f0e",
               "hybrid": "#17becf", "cache_replacement": "#1f77b4", "no_attention": "#bbbbbb"}


def _nan(x):
    return float("nan") if x is None else x


def _xy(series: dict, scale: float = 1 / FRAME_RATE):
    return [f * scale for f in series["frame"]], [_nan(v) for v in series["value"]]


def plot_context(context: dict, rope: dict | None = None, path=None):
    """Attention window per layer vs the intended conversation length (and the trained context)."""
    fig = _figure(figsize=(max(5, 0.35 * len(context["metrics"]["layers"]) + 3), 3.5))
    ax = fig.subplots()
    m = context["metrics"]
    names = list(m["layers"])
    frames = m["frames"]
    colors = KIND_COLORS
    for i, name in enumerate(names):
        row = m["layers"][name]
        w = row.get("window")
        ax.bar(i, frames if w is None else w, color=colors.get(row["kind"], "grey"),
               hatch="//" if w is None else None)
    ax.axhline(frames, color="black", ls="--", lw=1, label=f"intended length ({frames} frames)")
    trained = (rope or {}).get("metrics", {}).get("trained_context")
    if trained:
        ax.axhline(trained, color="purple", ls=":", lw=1, label=f"trained context ({trained} frames)")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=7)
    ax.set_ylabel("attention window (frames)")
    from matplotlib.patches import Patch

    kinds = list(dict.fromkeys(r["kind"] for r in m["layers"].values()))
    lines, labels = ax.get_legend_handles_labels()
    ax.legend([*(Patch(color=colors.get(k, "grey")) for k in kinds), *lines], [*kinds, *labels], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("attention window per layer vs conversation length (bars below the dashed line wrap)")
    return _finish(fig, path)


def plot_rope(rope: dict, path=None):
    """Wavelength of every RoPE pair vs the largest relative distance and the trained context."""
    fig = _figure(figsize=(6, 3.5))
    ax = fig.subplots()
    wl = rope["series"].get("wavelength_frames", [])
    m = rope["metrics"]
    ax.semilogy(range(len(wl)), wl, ".-", label=f"wavelength (max_period={m.get('max_period'):g})")
    ax.axhline(m["max_relative_distance"], color="C1", ls="--", label=f"max relative distance ({m['max_relative_distance']})")
    if m.get("trained_context"):
        ax.axhline(m["trained_context"], color="purple", ls=":", label=f"trained context ({m['trained_context']})")
    ax.axhline(m["max_absolute_position"] + 1, color="grey", ls="-.", lw=0.8,
               label=f"conversation ({m['max_absolute_position'] + 1} frames)")
    ax.set_xlabel("RoPE frequency pair")
    ax.set_ylabel("frames")
    ax.legend(fontsize=7)
    ax.set_title(f"RoPE: {m['share_wavelength_gt_max_distance']:.0%} of the pairs never complete a turn within "
                 "the attended distance", fontsize=9)
    return _finish(fig, path)


def plot_ttt_health(health: dict, path=None):
    """Fast-weight norm, mean/std and inner lr of every TTT layer over the stream."""
    fig = _figure(figsize=(11, 3.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for name, s in health["series"].items():
        if "fast_weight_norm" in s:
            axes[0].plot(*_xy(s["fast_weight_norm"]), label=name)
        if "fast_weight_std" in s:
            axes[1].plot(*_xy(s["fast_weight_std"]), label=f"{name} std")
        if "fast_weight_mean" in s:
            axes[1].plot(*_xy(s["fast_weight_mean"]), ls="--", label=f"{name} mean")
        if "eta_mean" in s:
            axes[2].plot(*_xy(s["eta_mean"]), label=name)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("fast-weight norm", "fast-weight mean / std", "inner lr (eta) mean")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time (s)")
        if ax.lines:
            ax.legend(fontsize=6)
    return _finish(fig, path)


def plot_drift(drift: dict, path=None):
    """Residual RMS entering every layer, and the RMS of every norm input, by position."""
    fig = _figure(figsize=(11, 3.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for key, s in drift["series"].items():
        kind, name = key.split("/", 1)
        ax = axes[0] if kind == "residual_rms" else axes[1]
        ax.plot(*_xy(s), lw=0.8, label=name)
    for row in drift["metrics"]["residual"].values():
        if row.get("max_jump_frame") is not None and (row.get("max_jump_ratio") or 0) > 1.5:
            axes[0].axvline(row["max_jump_frame"] / FRAME_RATE, color="red", lw=0.6, ls=":")
    for ax, title in zip(axes, ("residual RMS entering each layer", "RMS of each norm's input")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time (s)")
        ax.set_yscale("log")
        if len(ax.lines) <= 12:
            ax.legend(fontsize=6)
    return _finish(fig, path)


def plot_predictions(pred: dict, path=None):
    """Normalised entropy by position, and repetition / distinct-n of the predicted text per window."""
    fig = _figure(figsize=(9, 5.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    ax = axes[0]
    ax.plot(*_xy(pred["series"]["text_entropy"]), color="C0", lw=0.6, alpha=0.5)
    ax.plot(*_xy(pred["series"]["audio_entropy"]), color="C1", lw=0.6, alpha=0.5)
    rows = pred["series"]["windows"]
    mids = [(r["start_s"] + r["end_s"]) / 2 for r in rows]
    ax.plot(mids, [_nan(r["text_entropy"]) for r in rows], "o-", color="C0", label="text entropy")
    ax.plot(mids, [_nan(r["audio_entropy"]) for r in rows], "o-", color="C1", label="audio entropy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("normalised entropy")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, label, style in (("repetition_rate", "text n-gram repetition", "o-"), ("distinct_1", "text distinct-1", "o-"),
                              ("distinct_2", "text distinct-2", "s--"),
                              ("diversity", "text diversity (MATTR)", "d-."),
                              ("audio_repetition_rate", "audio n-gram repetition", "x:")):
        ax.plot(mids, [_nan(r[key]) for r in rows], style, ms=3, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time (s)")
    ax.legend(fontsize=7)
    axes[0].set_title("teacher-forced predictions by position")
    return _finish(fig, path)


def plot_usage(usage: dict, path=None):
    """KL(TTT on || TTT off) of the text predictions by position."""
    fig = _figure(figsize=(7, 3))
    ax = fig.subplots()
    s = usage["series"].get("text_kl_by_position")
    if s:
        x, y = _xy(s)
        ax.plot(x, y)
        if any(v > 0 for v in y if not math.isnan(v)):
            ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KL (nats)")
    ax.set_title("text predictions: KL(TTT on || TTT off) by position", fontsize=9)
    return _finish(fig, path)


PLOTTERS = {"context": plot_context, "rope": plot_rope, "ttt_health": plot_ttt_health, "drift": plot_drift,
            "predictions": plot_predictions, "ttt_usage": plot_usage}
