"""``cache_replacement``: attention keeps a short recent window; what leaves it goes to a TTT memory.

The layer's own keys and values (before RoPE, L2-normalised keys) are written, in order, into a
fast-weight memory that learns k -> v; the layer's queries read it. A query at frame t may only
see what has left the window: with mini-batches of b frames the memory is read with a lag of
``L = ceil(W / b) + 1`` mini-batches (the scan writes mini-batch j and, in the same step, serves
the queries of mini-batch j + L; no per-step copy of the fast weights is kept). The attention
window is ``L * b`` frames, so every past frame is always in the window or in the memory (a few
recent-enough frames are in both). Read mode ``add``: the memory read, normalised and projected
(zero-initialised) and gated, is added to the attention output.

Streaming (LMGen) runs moshi's ring-KV-cache attention of capacity ``L * b`` plus the same memory
fed one frame at a time, so it computes what the training forward computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.modules.transformer import _MHAState
from torch import nn

from moshi_ttt.models.attention import LocalStreamingAttention
from moshi_ttt.models.segments import current_segments, per_segment
from moshi_ttt.ttt import TTTConfig, TTTMemory, TTTState

MEMORY_READS = ("add",)


@dataclass
class _CacheReplacementState(_MHAState):
    ttt: TTTState | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if self.ttt is not None:
            self.ttt = self.ttt.reset(reset_mask)


class CacheReplacementAttention(LocalStreamingAttention):
    """moshi's attention module (same weights, same keys) + a TTT memory of evicted keys/values.

    Made in place from a moshi attention module by ``from_moshi_with_memory``; the new
    parameters (memory, lr projection, read norm/projection, gate) are its only trainable ones.
    """

    @classmethod
    def from_moshi_with_memory(cls, module, window: int, ttt_config: TTTConfig, name: str,
                               memory_read: str = "add", chunk_size: int | None = None,
                               backend: str = "sdpa") -> CacheReplacementAttention:
        if memory_read not in MEMORY_READS:
            raise ValueError(f"ttt.memory_read={memory_read!r} must be one of {MEMORY_READS}")
        if window < 1:
            raise ValueError(f"ttt.window={window} must be >= 1")
        b = int(ttt_config.mini_batch_size)
        lag = math.ceil(window / b) + 1
        module = LocalStreamingAttention.from_moshi(module, lag * b, chunk_size, backend)
        module.__class__ = cls
        module.fixed_window = True
        module._init_memory(ttt_config, name, lag, window, memory_read)
        return module

    def _init_memory(self, cfg: TTTConfig, name: str, lag: int, window: int, memory_read: str) -> None:
        if self.kv_repeat != 1:
            raise ValueError(f"{name}: cache_replacement needs one key per query head (kv_repeat=1)")
        head_dim = self.embed_dim // self.num_heads
        # One memory head per attention head: the memory stores exactly the heads' keys/values.
        cfg = TTTConfig(**{**cfg.__dict__, "num_heads": self.num_heads, "head_dim": head_dim})
        device = next(self.parameters()).device
        self.ttt_name = name
        self.memory_window = window
        self.memory_read = memory_read
        self.read_lag = lag
        self.memory = TTTMemory(cfg, head_dim, read_lag=lag).to(device)
        self.lr_proj = nn.Linear(self.embed_dim, cfg.num_heads, device=device)
        nn.init.normal_(self.lr_proj.weight, std=cfg.init_std)
        nn.init.zeros_(self.lr_proj.bias)
        self.read_norm = nn.LayerNorm(self.embed_dim, device=device)
        self.read_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False, device=device)
        nn.init.zeros_(self.read_proj.weight)
        self.gate_alpha = nn.Parameter(torch.full((self.embed_dim,), float(cfg.gate_init), device=device))
        self.ttt_enabled = True
        self._stats: dict[str, torch.Tensor] = {}

    # ---- streaming state -----------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> _CacheReplacementState:
        base = super()._init_streaming_state(batch_size)
        fields = {k: getattr(base, k) for k in ("batch_size", "device", "kv_cache", "offset", "offset_cpu")}
        state = _CacheReplacementState(**fields)
        state.ttt = self.memory.init_state(batch_size, self.gate_alpha.device)
        return state

    # ---- memory --------------------------------------------------------------------------
    def _memory_update(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        segments = current_segments() if state is None else None
        if segments is not None:  # packed conversations: a fresh memory for each
            return per_segment(x, segments, self._memory_read)
        return self._memory_read(x)

    def _memory_read(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        state = self._streaming_state
        q, k, v = self.project_qkv(x, rope=False)  # pre-RoPE: content only, the memory is position-free
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            q, k, v = F.normalize(q.to(dtype), dim=-1), F.normalize(k.to(dtype), dim=-1), v.to(dtype)
            logits = F.linear(x.to(dtype), self.lr_proj.weight.to(dtype), self.lr_proj.bias.to(dtype))
            lr = self.memory.eta(logits).transpose(1, 2)
            read, new_state = self.memory(q, k, v, lr, state.ttt if state is not None else None)
        if state is not None:
            state.ttt = new_state
        read = read.transpose(1, 2).reshape(B, T, self.embed_dim)
        out = self.read_proj(self.read_norm(read.to(self.read_norm.weight.dtype)))
        gate = torch.tanh(self.gate_alpha)
        y = (gate * out).to(x.dtype)
        with torch.no_grad():
            stats = self.memory.weight_stats(new_state)
            stats.update(eta_mean=lr.mean(), eta_min=lr.min(), eta_max=lr.max(), gate_mean_abs=gate.abs().mean())
            self._stats = stats
        return y

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        attn = super().forward(query, key, value)  # local window (training) or ring cache (streaming)
        if not self.ttt_enabled:
            return attn
        return attn + self._memory_update(query)

    def configure_for_stage(self, ttt_mini_batch_size: int | None = None, window: int | None = None) -> None:
        if ttt_mini_batch_size is not None and ttt_mini_batch_size != self.memory.mini_batch_size:
            raise ValueError(f"{self.ttt_name}: a stage asks for TTT mini-batch {ttt_mini_batch_size}, the memory "
                             f"was built with {self.memory.mini_batch_size}")

    def health(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._stats.items()}
