"""Long-context evaluation: loss by position, streaming generation with collapse-phase tracking,
and long-range recall (``python -m moshi_ttt.eval {loss,generate,recall}``)."""

from __future__ import annotations

import importlib

_LAZY = {
    "position_losses": "moshi_ttt.eval.position_loss",
    "compare_models": "moshi_ttt.eval.position_loss",
    "frame_losses": "moshi_ttt.eval.position_loss",
    "LossComparison": "moshi_ttt.eval.position_loss",
    "recall_accuracy": "moshi_ttt.eval.recall",
    "recall_report": "moshi_ttt.eval.recall",
    "late_loss": "moshi_ttt.eval.recall",
    "generate_and_track": "moshi_ttt.eval.generate",
    "track_windows": "moshi_ttt.eval.generate",
    "Timeline": "moshi_ttt.eval.generate",
    "PHASES": "moshi_ttt.eval.phases",
    "PhaseThresholds": "moshi_ttt.eval.phases",
    "classify_window": "moshi_ttt.eval.phases",
    "token_stats": "moshi_ttt.eval.phases",
    "load_models": "moshi_ttt.eval.models",
    "load_codes": "moshi_ttt.eval.samples",
    "iter_samples": "moshi_ttt.eval.samples",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moshi_ttt.eval' has no attribute {name!r}")
