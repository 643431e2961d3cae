"""TTT state health over a long stream: fast-weight norm/mean/std after every chunk (one TTT
mini-batch by default), divergence, and the inner learning rates (eta) the layers used.

Norms are those of ``TTTMemory.weight_stats`` (per sample and head, the Frobenius norm of all
weight matrices, averaged), judged relative to ``sqrt(head_dim * matrices)``: the norm of
identity-like fast weights, whatever the head width or inner model. A memory that diverges
(huge inner lr, no ``ttt.weight_norm_clip``) jumps orders of magnitude past it or goes non-finite.
"""

from __future__ import annotations

import math

import numpy as np

from moshi_ttt.diagnostics.findings import CheckResult, bucket, seconds
from moshi_ttt.diagnostics.thresholds import DEFAULTS, Thresholds


def _arr(row: dict, key: str) -> np.ndarray:
    return np.asarray(row.get(key, []), dtype=np.float64)


def layer_health(row: dict, initial: dict, info: dict, th: Thresholds = DEFAULTS) -> dict:
    """Numbers of one layer from its per-chunk stats ``row`` (stat -> list, with ``end_frame``)."""
    frames = np.asarray(row["end_frame"], dtype=np.int64)
    norm = _arr(row, "fast_weight_norm")
    mean, std = _arr(row, "fast_weight_mean"), _arr(row, "fast_weight_std")
    finite = np.isfinite(norm) & np.isfinite(mean) & np.isfinite(std)
    bad = np.flatnonzero(~finite)
    init = float(initial.get("fast_weight_norm", float("nan")))
    scale = float(info.get("norm_scale", 1.0))
    out: dict = {"chunks": int(frames.size), "initial_norm": init, "norm_scale": scale,
                 "first_nonfinite_frame": int(frames[bad[0]]) if bad.size else None}
    good = np.where(finite, norm, np.nan)
    if np.isfinite(good).any():
        i = int(np.nanargmax(good))
        mid = good[len(good) // 2]
        out.update(final_norm=float(norm[-1]), max_norm=float(good[i]), max_norm_frame=int(frames[i]),
                   max_norm_rel=float(good[i]) / scale,
                   growth=float(good[i]) / init if init > 0 else float("nan"),
                   late_growth=float(norm[-1] / mid) if len(good) >= 4 and mid > 0 else float("nan"),
                   final_mean=float(mean[-1]), final_std=float(std[-1]),
                   max_abs_mean_over_std=float(np.nanmax(np.abs(mean) / np.maximum(std, 1e-30))))
    eta_mean, eta_hi, eta_lo = _arr(row, "eta_mean"), _arr(row, "eta_max"), _arr(row, "eta_min")
    if eta_mean.size:
        ceiling = float(info.get("eta_max_config", math.inf))
        out.update(eta_mean=float(np.nanmean(eta_mean)), eta_min=float(np.nanmin(eta_lo)),
                   eta_max=float(np.nanmax(eta_hi)),
                   eta_saturated_share=float(np.mean(eta_hi >= ceiling * (1 - 1e-6))), eta_max_config=ceiling)
    for key in ("gate_mean_abs", "out_in_norm_ratio", "alpha_mean"):
        if key in row and len(row[key]):
            out[key] = float(np.nanmean(_arr(row, key)))
    return out


def check_ttt_health(chunks: dict, initial: dict, info: dict, th: Thresholds = DEFAULTS,
                     max_points: int = 256) -> CheckResult:
    """``chunks``: layer -> {"end_frame": [...], "fast_weight_norm": [...], "eta_mean": [...], ...}
    (``StreamRecord.ttt_chunks``); ``initial``: layer -> stats of the learned initial weights;
    ``info``: layer -> {"norm_scale", "eta_max_config", ...}."""
    res = CheckResult("ttt_health")
    if not chunks:
        res.add("ok", "no TTT layers: nothing to check")
        return res
    layers = {}
    for name, row in chunks.items():
        m = layer_health(row, initial.get(name, {}), info.get(name, {}), th)
        layers[name] = m
        frames = row["end_frame"]
        res.series[name] = {k: _series(frames, row.get(k, []), max_points)
                            for k in ("fast_weight_norm", "fast_weight_mean", "fast_weight_std", "eta_mean")
                            if len(row.get(k, []))}
        if not frames:
            res.add("warn", f"{name}: no chunk recorded", name)
            continue
        flagged = False
        if m["first_nonfinite_frame"] is not None:
            res.add("fail", f"{name}: fast weights diverged: non-finite from the chunk ending at frame "
                    f"{m['first_nonfinite_frame']} (lower ttt.ttt_layer.base_lr / eta_max; with the minibatch_gd rule, or set ttt.ttt_layer.weight_norm_clip)", name)
            flagged = True
        if "max_norm" not in m:
            continue
        rel = m["max_norm_rel"]
        where = f"norm {m['max_norm']:.3g} at frame {m['max_norm_frame']}"
        if rel > th.weight_norm_fail:
            res.add("fail", f"{name}: fast weights diverged: {where} = {rel:.3g}x the identity scale "
                    f"{m['norm_scale']:.3g} (> {th.weight_norm_fail:g}x; {m['growth']:.3g}x the initial weights)", name)
            flagged = True
        elif rel > th.weight_norm_warn:
            res.add("warn", f"{name}: large fast weights: {where} = {rel:.3g}x the identity scale "
                    f"(> {th.weight_norm_warn:g}x)", name)
            flagged = True
        if math.isfinite(m["late_growth"]) and m["late_growth"] > th.late_growth:
            res.add("warn", f"{name}: fast-weight norm still growing: x{m['late_growth']:.3g} over the second half "
                    f"of the stream (to {seconds(frames[-1])}); unbounded growth ends in divergence", name)
            flagged = True
        if m["max_abs_mean_over_std"] > th.weight_mean_over_std:
            res.add("warn", f"{name}: fast weights drifted off centre: mean up to "
                    f"{m['max_abs_mean_over_std']:.3g}x their std", name)
            flagged = True
        if "eta_mean" in m:
            if m["eta_saturated_share"] > th.eta_saturated:
                res.add("warn", f"{name}: inner lr clamped at ttt.eta_max={m['eta_max_config']:g} in "
                        f"{m['eta_saturated_share']:.0%} of the chunks", name)
                flagged = True
            if m["eta_mean"] < th.eta_vanishing:
                res.add("warn", f"{name}: inner lr ~0 (mean {m['eta_mean']:.2g}): the memory is not being written",
                        name)
                flagged = True
        if not flagged:
            eta = f", inner lr mean {m['eta_mean']:.3g} (range {m['eta_min']:.3g}-{m['eta_max']:.3g})" \
                if "eta_mean" in m else ""
            res.add("ok", f"{name}: fast weights stable over {seconds(frames[-1])}: norm {m['initial_norm']:.3g} -> "
                    f"{m['final_norm']:.3g} (max {m['max_norm_rel']:.3g}x the identity scale){eta}", name)
    res.metrics = {"layers": layers}
    return res


def _series(frames, values, max_points: int) -> dict:
    frames = np.asarray(frames, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if frames.size <= max_points:
        return {"frame": frames.tolist(), "value": values.tolist()}
    size = math.ceil(frames.size / max_points)
    b = bucket(values, max_points)
    return {"frame": [float(frames[min(frames.size - 1, i * size + size - 1)]) for i in range(len(b["value"]))],
            "value": b["value"]}
