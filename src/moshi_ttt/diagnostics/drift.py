"""Normalisation-input drift and residual-norm jumps by position.

Every RMSNorm/LayerNorm input (each layer's ``norm1``/``norm2``, the final ``out_norm``) is
summarised per frame by its RMS, mean and std over channels; drift compares the last window of
the stream with the first. The residual stream entering each layer is summarised by its RMS per
frame; a jump is a frame whose RMS exceeds the median of the previous ``jump_window`` frames by
``jump_ratio`` (the lab notes saw one where the KV cache wrapped: a jump at a layer's attention
window is reported as such).
"""

from __future__ import annotations

import numpy as np

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.diagnostics.findings import CheckResult, bucket, seconds
from moshi_ttt.diagnostics.thresholds import DEFAULTS, Thresholds


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def largest_jump(series: np.ndarray, window: int, threshold: float | None = None) -> tuple[float, int | None]:
    """(ratio, frame): the largest ``x[t] / median(x[t - window : t])`` over t >= window, and where
    it happens: the first frame whose ratio reaches ``threshold`` (the onset of the jump; the
    largest ratio often lands a few noisy frames later), else the frame of the largest ratio."""
    x = np.asarray(series, dtype=np.float64)
    if x.size <= window or window < 1:
        return float("nan"), None
    past = np.lib.stride_tricks.sliding_window_view(x[:-1], window)  # row j: x[j : j + window]
    with np.errstate(invalid="ignore", divide="ignore"):
        base = np.nanmedian(past, axis=1) if np.isnan(past).any() else np.median(past, axis=1)
        ratio = x[window:] / base
    ratio = np.where(np.isfinite(ratio), ratio, np.nan)
    if not np.isfinite(ratio).any():
        return float("nan"), None
    j = int(np.nanargmax(ratio))
    if threshold is not None and ratio[j] >= threshold:
        j = int(np.flatnonzero(ratio >= threshold)[0])
    return float(np.nanmax(ratio)), j + window


def drift_windows(frames: int, window_frames: int) -> tuple[slice, slice]:
    """The first and last windows compared (each at most a quarter of the stream)."""
    n = max(1, min(window_frames, frames // 4 if frames >= 4 else frames))
    return slice(0, n), slice(frames - n, frames)


def check_drift(residual: dict, norm_inputs: dict, windows: dict | None = None, window_frames: int = 125,
                th: Thresholds = DEFAULTS, max_points: int = 256) -> CheckResult:
    """``residual``: layer -> [T] RMS of the layer's input; ``norm_inputs``: name -> {"rms", "mean",
    "std"} [T] each; ``windows``: layer -> attention window (to name wraparound jumps)."""
    res = CheckResult("drift")
    windows = windows or {}
    norms, jumps = {}, {}
    for name, stats in norm_inputs.items():
        rms = np.asarray(stats["rms"], dtype=np.float64)
        first, last = drift_windows(rms.size, window_frames)
        early, late = _nanmean(rms[first]), _nanmean(rms[last])
        mean = np.asarray(stats["mean"], dtype=np.float64)
        ratio = late / early if early > 0 else float("nan")
        row = {"early_rms": early, "late_rms": late, "rms_ratio": ratio, "early_mean": _nanmean(mean[first]),
               "late_mean": _nanmean(mean[last]), "max_abs_mean": float(np.nanmax(np.abs(mean))) if
               np.isfinite(mean).any() else float("nan"), "late_std": _nanmean(np.asarray(stats["std"])[last])}
        norms[name] = row
        res.series[f"norm_rms/{name}"] = bucket(rms, max_points)
        if not np.isfinite(late) and np.isfinite(early):
            res.add("fail", f"{name}: norm input becomes non-finite", name)
        elif np.isfinite(ratio) and (ratio > th.drift_ratio or ratio < 1 / th.drift_ratio):
            res.add("warn", f"{name}: norm input drifts: RMS {early:.3g} in the first {first.stop} frames -> "
                    f"{late:.3g} in the last {last.stop - last.start} (x{ratio:.3g}, threshold x{th.drift_ratio:g})",
                    name)
        if np.isfinite(row["max_abs_mean"]) and row["max_abs_mean"] > th.norm_mean_abs:
            res.add("warn", f"{name}: norm input mean reaches {row['max_abs_mean']:.3g} (abs > "
                    f"{th.norm_mean_abs:g})", name)
    for name, rms in residual.items():
        rms = np.asarray(rms, dtype=np.float64)
        ratio, frame = largest_jump(rms, th.jump_window, th.jump_ratio)
        jumps[name] = {"max_jump_ratio": ratio, "max_jump_frame": frame, "mean_rms": _nanmean(rms)}
        res.series[f"residual_rms/{name}"] = bucket(rms, max_points)
        if frame is not None and ratio > th.jump_ratio:
            at_window = [lay for lay, w in windows.items() if w is not None and abs(frame - w) <= 2]
            note = (f": at the attention window of {', '.join(at_window)} (the ring KV cache starts dropping "
                    "frames here: wraparound)") if at_window else ""
            res.add("warn", f"{name}: residual RMS jumps x{ratio:.3g} at frame {frame} "
                    f"(t={frame / FRAME_RATE:.1f} s) over the median of the previous {th.jump_window} frames{note}", name)
    res.metrics = {"window_frames": window_frames, "norm_inputs": norms, "residual": jumps}
    if not res.flagged():
        res.add("ok", f"no norm-input drift beyond x{th.drift_ratio:g} and no residual jump beyond "
                f"x{th.jump_ratio:g} over {seconds(next(iter(residual.values())).size if residual else 0)}")
    return res
