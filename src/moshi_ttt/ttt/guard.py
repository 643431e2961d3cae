"""NaN/Inf guard: fail at the first bad position with the layer's name, not steps later in the loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moshi_ttt.ttt.config import config_key

Tensor = torch.Tensor


def check_finite(
    name: str, out: Tensor, x: Tensor, positions: Sequence[int], weights: dict[str, Tensor], rule: str = "delta"
) -> None:
    """Raise FloatingPointError if ``out`` [B, T, ...] or the fast weights hold a NaN/Inf.

    ``positions`` are the stream positions of the chunk's first token per sample, so the message
    gives the absolute position in the conversation. One device sync on the good path. Inside a
    mini-batch the dual form mixes tokens (0 * NaN is NaN), so a bad input is reported at its
    own position, and a divergence at the first non-finite output (mini-batch resolution).
    """
    ok = torch.isfinite(out).all()
    for w in weights.values():
        ok = ok & torch.isfinite(w).all()
    if bool(ok):
        return
    bad_in = ~torch.isfinite(x.flatten(2)).all(-1)  # [B, T]
    bad = ~torch.isfinite(out.flatten(2)).all(-1)
    if bool(bad_in.any()):  # a bad input poisons its whole mini-batch in the dual form: name the input
        s, t = _first(bad_in)
        raise FloatingPointError(
            f"TTT layer {name!r}: non-finite output; the layer input is already non-finite at sample {s}, "
            f"position {positions[s] + t} (index {t} of this chunk of {x.shape[1]})"
        )
    if bool(bad.any()):
        s, t = _first(bad)
        raise FloatingPointError(
            f"TTT layer {name!r}: non-finite output at sample {s}, position {positions[s] + t} "
            f"(index {t} of this chunk of {out.shape[1]}) with a finite input: the fast weights diverged "
            f"(lower {config_key('base_lr')} or {config_key('eta_max')}"
            + (f", or set {config_key('weight_norm_clip')})" if rule == "minibatch_gd" else
               ": a delta-rule write on keys [k, 1] with unit k contracts while base_lr * sigmoid stays below 1)")
        )
    for k, w in weights.items():
        bad_w = ~torch.isfinite(w.flatten(1)).all(-1)
        if bool(bad_w.any()):
            s = int(bad_w.nonzero()[0])
            raise FloatingPointError(
                f"TTT layer {name!r}: non-finite fast weight {k!r} at sample {s} after position "
                f"{positions[s] + out.shape[1] - 1}"
            )


def _first(bad: Tensor) -> tuple[int, int]:
    """(sample, chunk index) of the earliest True of a [B, T] mask, lowest sample first."""
    t = int(bad.any(0).nonzero()[0])
    return int(bad[:, t].nonzero()[0]), t
