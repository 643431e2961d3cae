"""Attention context and KV-cache capacity per layer against the intended conversation length.

In streaming (LMGen) every self-attention layer keeps a ring KV cache of ``context`` frames; its
training forward masks the same window. Once a conversation is longer than the window, the ring
wraps and the oldest frames are overwritten: from frame ``W`` on, frame 0 is out of reach, and at
the end of a T-frame conversation ``T - W`` frames are. A layer with a TTT memory that reads the
stream before attention drops it (a variant with ``has_memory``: pre_attention, hybrid,
cache_replacement) still carries them; each variant words its own finding (``context_message``).
"""

from __future__ import annotations

from moshi_ttt.diagnostics.findings import CheckResult, seconds
from moshi_ttt.diagnostics.layout import ModelLayout
from moshi_ttt.models.variants import find_variant, has_memory


def wraps(frames: int, window: int | None) -> int:
    """How many times a ring cache of ``window`` frames has wrapped after ``frames`` frames."""
    if window is None or frames <= window:
        return 0
    return (frames - 1) // window


def check_context(layout: ModelLayout, frames: int, batch_size: int = 1) -> CheckResult:
    """Per layer: window, streaming KV-cache capacity and size, wraparounds over ``frames`` frames."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    res = CheckResult("context")
    per_layer = {}
    forgetting, keeping = [], []
    for lay in layout.layers:
        if lay.kind == "no_attention":
            per_layer[lay.name] = {"kind": lay.kind, "window": None}
            continue
        W = lay.window
        capacity = W if W is not None else frames  # moshi streams with a ring of `context` frames
        cache_mib = 2 * batch_size * lay.kv_heads * capacity * lay.head_dim * lay.cache_bytes_per_value / 2**20
        n_wraps = wraps(frames, W)
        row = {"kind": lay.kind, "window": W, "kv_cache_capacity": capacity, "kv_cache_mib": cache_mib,
               "wraps": n_wraps, "first_forgotten_frame": W if n_wraps else None,
               "frames_out_of_window_at_end": max(0, frames - W) if W is not None else 0,
               "retains_older_frames": has_memory(lay.kind)}
        per_layer[lay.name] = row
        name, where = lay.name, (f"attention window {seconds(W)} < intended {seconds(frames)}" if W else "")
        if W is None:
            res.add("warn", f"{name}: unbounded attention (no context): the KV cache must hold all {frames} frames "
                    "(memory and time grow with the conversation; moshi cannot stream it)", name)
        elif not n_wraps:
            res.add("ok", f"{name}: attention window {seconds(W)} covers the intended {seconds(frames)}: no wraparound",
                    name)
        else:  # the variant says how its layer keeps older frames, or why it cannot
            variant = find_variant(lay.kind)
            message = "" if variant is None else variant.context_message(
                name=name, window=seconds(W), where=where, wraps=n_wraps, ttt_window=lay.ttt_window)
            if variant is not None and variant.has_memory:
                keeping.append(name)
                res.add("ok", message, name)
            else:
                forgetting.append(name)
                res.add("warn", f"{name}: {where}: the ring KV cache wraps {n_wraps}x (wraparound); frames older "
                        f"than {W} are dropped from frame {seconds(W)} on{message}", name)
    windows = [r["window"] for r in per_layer.values() if r.get("window") is not None]
    res.metrics = {"frames": frames, "batch_size": batch_size, "min_window": min(windows, default=None),
                   "max_window": max(windows, default=None),
                   "kv_cache_mib_total": sum(r.get("kv_cache_mib", 0.0) for r in per_layer.values()),
                   "layers_forgetting": forgetting, "layers_with_memory": keeping, "layers": per_layer}
    if forgetting and not keeping:
        res.add("warn", f"no layer attends beyond {seconds(max(windows))} and none has a TTT memory: the model "
                f"cannot use anything older in a {seconds(frames)} conversation", "model")
    elif keeping and forgetting:
        res.add("ok", f"frames older than the attention windows are carried only by the TTT memory of "
                f"{', '.join(keeping)}", "model")
    return res
