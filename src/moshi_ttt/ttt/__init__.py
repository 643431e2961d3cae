"""TTT layers: a fast-weight memory updated by a gradient step per mini-batch (no Moshi inside).

- ``TTTConfig``: the settings (the Hydra keys under ``ttt.layer``); ``check_stage_mini_batch``: the stage rule.
- ``TTTLayer(config, dim, name)``: x [B, T, dim] -> (tanh(alpha) * TTT(x), state); add it to a residual.
- ``TTTMemory(config, head_dim, read_lag)``: the memory alone, written with (k, v), read with q.
- ``TTTState``: per-sample fast weights plus the unwritten tail, for streaming and resets.
- ``ttt_scan``: the functional dual-form scan, with a separate query stream and a read lag.
- ``reference`` (imported on demand): the same computation written plainly, token by token; read
  it first, the tests hold the fast path to it.
"""

from moshi_ttt.ttt.config import TTTConfig, check_stage_mini_batch
from moshi_ttt.ttt.guard import check_finite
from moshi_ttt.ttt.inner import InnerModel, LinearInner, MLPInner, layer_norm, ln_l2_grad, make_inner
from moshi_ttt.ttt.layer import TTTLayer
from moshi_ttt.ttt.memory import TTTMemory
from moshi_ttt.ttt.scan import clip_weights, ttt_scan
from moshi_ttt.ttt.state import TTTState

__all__ = [
    "InnerModel",
    "LinearInner",
    "MLPInner",
    "TTTConfig",
    "TTTLayer",
    "TTTMemory",
    "TTTState",
    "check_finite",
    "check_stage_mini_batch",
    "clip_weights",
    "layer_norm",
    "ln_l2_grad",
    "make_inner",
    "ttt_scan",
]
