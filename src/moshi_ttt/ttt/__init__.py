"""TTT layers: a fast-weight memory updated by a gradient step per mini-batch (no Moshi inside).

- ``TTTConfig``: the settings (the Hydra keys under ``ttt.ttt_layer``); ``check_stage_mini_batch``: the stage rule.
- ``TTTLayer(config, dim, name)``: x [B, T, dim] -> (tanh(alpha) * TTT(x), state); add it to a residual.
- ``TTTMemory(config, head_dim, read_lag)``: the memory alone, written with (k, v), read with q.
- ``TTTState``: per-sample fast weights plus the unwritten tail, for streaming and resets.
- ``ttt_scan``: the functional dual-form scan, with a separate query stream and a read lag.
- ``reference`` (imported on demand): the same computation written plainly, token by token; read
  it first, the tests hold the fast path to it.

Names are imported on first use, so ``moshi_ttt.ttt.config`` (plain dataclasses, read by the
config schema when ``python train.py`` composes its config) does not import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "TTTConfig": "config",
    "check_stage_mini_batch": "config",
    "check_finite": "guard",
    "InnerModel": "inner",
    "LinearInner": "inner",
    "MLPInner": "inner",
    "layer_norm": "inner",
    "ln_l2_grad": "inner",
    "make_inner": "inner",
    "TTTLayer": "layer",
    "TTTMemory": "memory",
    "clip_weights": "scan",
    "ttt_scan": "scan",
    "TTTState": "state",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
