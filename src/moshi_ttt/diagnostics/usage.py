"""Is TTT used at all? The gates and output projections of every TTT layer, and how much the
model's output changes when every TTT branch is switched off (``set_ttt_enabled``).

A TTT layer returns ``tanh(alpha) * proj(read)``: with the gate at zero, or the zero-initialised
projection still at zero (an untrained layer), it adds nothing, and the model is its base.
The output comparison runs the same teacher-forced stream twice, chunked (linear in T).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from moshi_ttt.diagnostics.findings import CheckResult, bucket
from moshi_ttt.diagnostics.layout import TTTModule, ttt_modules
from moshi_ttt.diagnostics.stream import iter_chunks, nan_guard_off
from moshi_ttt.diagnostics.thresholds import DEFAULTS, Thresholds

logger = logging.getLogger(__name__)


def gate_stats(mod: TTTModule) -> dict:
    gate = mod.gate.abs()
    out = {"kind": mod.kind, "gate_mean_abs": float(gate.mean()), "gate_max_abs": float(gate.max())}
    proj = mod.projection
    out["projection_norm"] = None if proj is None else float(proj.norm())
    return out


def _set_enabled(mods: list[TTTModule], flags: list[bool]) -> None:
    for m, f in zip(mods, flags):
        m.module.ttt_enabled = f


def output_difference(model, codes: torch.Tensor, chunk_frames: int, mods: list[TTTModule] | None = None) -> dict:
    """Teacher-forced text predictions and hidden states with every TTT branch on vs off.

    Returns the relative L2 change of the hidden states, the mean/max KL(on || off) of the text
    distributions, the share of frames whose argmax text token changes, and KL by position."""
    mods = ttt_modules(model) if mods is None else mods
    before = [bool(m.module.ttt_enabled) for m in mods]
    on_hidden, on_logp = [], []
    # a diverging memory is a finding ("output with TTT is not finite"), not a crash
    with nan_guard_off(mods):
        try:
            _set_enabled(mods, [True] * len(mods))
            for ch in iter_chunks(model, codes, chunk_frames, audio=False):
                on_hidden.append(ch.hidden.float().cpu())
                on_logp.append(torch.log_softmax(ch.text_logits.float(), -1).cpu())
            _set_enabled(mods, [False] * len(mods))
            diff_sq = ref_sq = 0.0
            kl, changed = [], []
            for i, ch in enumerate(iter_chunks(model, codes, chunk_frames, audio=False)):
                h_off = ch.hidden.float().cpu()
                diff_sq += float((on_hidden[i] - h_off).pow(2).sum())
                ref_sq += float(h_off.pow(2).sum())
                lp_off = torch.log_softmax(ch.text_logits.float(), -1).cpu()
                lp_on = on_logp[i]
                kl.append((lp_on.exp() * (lp_on - lp_off)).sum(-1).clamp_min(0))  # [B, C]
                changed.append(lp_on.argmax(-1) != lp_off.argmax(-1))
        finally:
            _set_enabled(mods, before)
    kl_t = torch.cat(kl, dim=1)  # [B, T]
    valid = (codes[:, 0] >= 0).cpu()
    kl_valid = kl_t[valid]
    by_pos = torch.where(valid, kl_t, torch.nan).nanmean(0).numpy()
    return {"frames": int(codes.shape[-1]), "rel_hidden_diff": (diff_sq / max(ref_sq, 1e-30)) ** 0.5,
            "text_kl_mean": float(kl_valid.mean()) if kl_valid.numel() else float("nan"),
            "text_kl_max": float(kl_valid.max()) if kl_valid.numel() else float("nan"),
            "argmax_changed_share": float(torch.cat(changed, 1)[valid].float().mean()) if kl_valid.numel() else 0.0,
            "kl_by_position": by_pos}


def check_ttt_usage(model, codes: torch.Tensor | None = None, chunk_frames: int = 16,
                    th: Thresholds = DEFAULTS, max_points: int = 256) -> CheckResult:
    """Gates near zero, zero projections and (with ``codes`` [B, 17, T]) the output difference
    with TTT disabled; any of them flags 'TTT unused'."""
    res = CheckResult("ttt_usage")
    mods = ttt_modules(model)
    if not mods:
        res.metrics = {"ttt_layers": 0}
        res.add("ok", "no TTT layers (base model): nothing to use")
        return res
    layers = {}
    for m in mods:
        s = layers[m.name] = gate_stats(m)
        if s["gate_max_abs"] < th.gate_eps:
            res.add("fail", f"{m.name}: TTT unused: gate tanh(alpha) ~0 (max abs {s['gate_max_abs']:.2g} < "
                    f"{th.gate_eps:g}): the branch adds nothing", m.name)
        elif s["projection_norm"] is not None and s["projection_norm"] == 0.0:
            res.add("fail", f"{m.name}: TTT unused: its output projection is all zeros (an untrained layer: "
                    "the projection starts at zero)", m.name)
        else:
            res.add("ok", f"{m.name}: gate mean abs(tanh(alpha)) {s['gate_mean_abs']:.3g} "
                    f"(max {s['gate_max_abs']:.3g})", m.name)
    res.metrics = {"ttt_layers": len(mods), "layers": layers}
    if codes is not None:
        logger.info("TTT usage: %d frames with TTT on and off", codes.shape[-1])
        diff = output_difference(model, codes, chunk_frames, mods)
        kl_by_pos = diff.pop("kl_by_position")
        res.metrics["output"] = diff
        res.series["text_kl_by_position"] = bucket(kl_by_pos, max_points)
        rel = diff["rel_hidden_diff"]
        what = (f"TTT off changes the hidden states by {rel:.3g} (relative L2) and the text predictions by "
                f"KL {diff['text_kl_mean']:.3g} on average over {diff['frames']} frames")
        if not np.isfinite(rel):
            res.add("fail", f"model: output with TTT is not finite ({what})", "model")
        elif rel < th.unused_rel_diff:
            res.add("fail", f"model: TTT unused: {what}", "model")
        elif rel < th.weak_rel_diff:
            res.add("warn", f"model: TTT barely used: {what}", "model")
        else:
            res.add("ok", f"model: {what}; the argmax text token changes at {diff['argmax_changed_share']:.1%} "
                    "of frames", "model")
    return res
