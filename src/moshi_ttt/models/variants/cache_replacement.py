"""``cache_replacement``: attention keeps a short recent window; what leaves it goes to a TTT memory.

The layer's own keys and values (before RoPE, L2-normalised keys) are written, in order, into a
fast-weight memory that learns k -> v; the layer's queries read it. A query at frame t may only
see what has left the window: with mini-batches of b frames the memory is read with a lag of
``L = ceil(W / b) + 1`` mini-batches (the scan writes mini-batch j and, in the same step, serves
the queries of mini-batch j + L; no per-step copy of the fast weights is kept). The attention
window is ``L * b`` frames, so every past frame is always in the window or in the memory (a few
recent-enough frames are in both). Packed conversations run this layer once per conversation
(attention and memory), as inference would.

How the queries read the memory is ``ttt.memory_read``, one subclass each of
``CacheReplacementAttention`` (``MEMORY_READS``): ``add`` (``AddReadAttention``) and
``kv_slots`` (``KVSlotsAttention``).

Streaming (LMGen) runs moshi's ring-KV-cache attention of capacity ``L * b`` plus the same memory
fed one frame at a time, so it computes what the training forward computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from moshi.modules.transformer import StreamingTransformerLayer, _MHAState
from torch import nn

from moshi_ttt.config.errors import bad
from moshi_ttt.models.attention import LocalStreamingAttention, local_attention
from moshi_ttt.models.variants.base import InstallContext, MemoryStateMixin, Variant, VariantModule, register
from moshi_ttt.ttt import TTTConfig, TTTMemory, TTTState


def read_lag(window: int, mini_batch: int) -> int:
    """L = ceil(W / b) + 1 mini-batches: the memory serves a query only what left the W-frame
    window; the attention keeps L * b frames."""
    return math.ceil(window / mini_batch) + 1


@dataclass
class _CacheReplacementState(MemoryStateMixin, _MHAState):
    ttt: TTTState | None = None


class CacheReplacementAttention(LocalStreamingAttention, VariantModule):
    """moshi's attention module (same weights, same keys) + a TTT memory of evicted keys/values;
    a subclass per ``ttt.memory_read`` reads it (``_init_read``, ``forward_with_ttt``).

    Made in place from a moshi attention module by ``from_moshi_with_memory``; the new
    parameters (memory, lr projection, the read's own) are its only trainable ones. (The mixin
    comes last so that the class keeps moshi's layout: ``from_moshi`` swaps ``__class__``.)
    """

    variant_name = "cache_replacement"
    memory_read: ClassVar[str]

    @classmethod
    def from_moshi_with_memory(cls, module, window: int, ttt_config: TTTConfig, name: str,
                               chunk_size: int | None = None, backend: str = "sdpa",
                               key_adapter: bool = False) -> CacheReplacementAttention:
        if window < 1:
            raise ValueError(f"ttt.ttt_layer_attention_window={window} must be >= 1")
        ttt_config = ttt_config.resolved()
        b = int(ttt_config.mini_batch_size)
        lag = read_lag(window, b)
        module = cls.from_moshi(module, lag * b, chunk_size, backend)
        module.fixed_window = True
        module._init_memory(ttt_config, name, lag, window, key_adapter)
        return module

    def _init_memory(self, cfg: TTTConfig, name: str, lag: int, window: int, key_adapter: bool = False) -> None:
        if self.kv_repeat != 1:
            raise ValueError(f"{name}: cache_replacement needs one key per query head (kv_repeat=1)")
        head_dim = self.embed_dim // self.num_heads
        # One memory head per attention head: the memory stores exactly the heads' keys/values.
        cfg = replace(cfg, num_heads=self.num_heads, head_dim=head_dim)
        device = next(self.parameters()).device
        self.ttt_name = name
        self.memory_window = window
        self.read_lag = lag
        self.memory = TTTMemory(cfg, head_dim, read_lag=lag).to(device)
        # ttt.memory_key_adapter: per-head maps (from identity) of the queries [0] and keys [1]
        # the memory reads and writes with; attention keeps its own
        self.key_adapter = (nn.Parameter(torch.zeros(2, self.num_heads, head_dim, head_dim, device=device))
                            if key_adapter else None)
        self.lr_proj = nn.Linear(self.embed_dim, cfg.num_heads, device=device)
        nn.init.normal_(self.lr_proj.weight, std=cfg.init_std)
        nn.init.zeros_(self.lr_proj.bias)
        decay_proj = self.memory.make_decay_proj(self.embed_dim)  # the delta rule's forgetting (ttt.ttt_layer.decay)
        self.decay_proj = None if decay_proj is None else decay_proj.to(device)
        self._init_read(cfg, device)
        self.ttt_enabled = True
        self._stats: dict[str, torch.Tensor] = {}

    # ---- what a read says ----------------------------------------------------------------
    def _init_read(self, cfg: TTTConfig, device: torch.device) -> None:
        """The read's own parameters, ``gate_alpha`` among them (after the memory's: same init order)."""
        raise NotImplementedError

    def forward_with_ttt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _read_parameters(self) -> list[nn.Parameter]:
        """The read's parameters that open the memory's path, besides the gate."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------
    def forward_without_ttt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The frozen attention alone: the local window (training) or the ring cache (streaming)."""
        return super().forward(query, key, value)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not self.ttt_enabled:
            return self.forward_without_ttt(query, key, value)
        return self.forward_with_ttt(query, key, value)

    def _init_streaming_state(self, batch_size: int) -> _CacheReplacementState:
        base = super()._init_streaming_state(batch_size)
        fields = {k: getattr(base, k) for k in ("batch_size", "device", "kv_cache", "offset", "offset_cpu")}
        state = _CacheReplacementState(**fields)
        state.ttt = self.memory.init_state(batch_size, self.gate_alpha.device)
        return state

    def _memory_inputs(self, x: torch.Tensor):
        """Pre-RoPE (q, k, v) [B, H, T, D], the memory's per-token learning rates [B, H, T] and its
        log-decays [B, H, T] (None without ``ttt.ttt_layer.decay``)."""
        q, k, v = self.project_qkv(x, rope=False)
        return q, k, v, self.memory.learning_rates(self.lr_proj, x), self.memory.log_decays(self.decay_proj, x)

    def _lagged_read(self, q, k, v, lr, log_decay=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (k, v) and read at q [B, H, T, D], pre-RoPE (content only: the memory is
        position-free), with the read lag; carries the streaming state. Returns (read fp32, q)."""
        state = self._streaming_state
        with torch.autocast(device_type=q.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)
            q, k = q.to(dtype), k.to(dtype)
            if self.key_adapter is not None:
                adapter = self.key_adapter.to(dtype)
                q, k = q + q @ adapter[0], k + k @ adapter[1]
            nq, nk = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            read, new_state = self.memory(nq, nk, v.to(dtype), lr, state.ttt if state is not None else None,
                                          log_decay)
        if state is not None:
            state.ttt = new_state
        self._record_stats(new_state, lr)
        return read, nq

    def _record_stats(self, ttt_state: TTTState, lr: torch.Tensor) -> None:
        with torch.no_grad():
            stats = self.memory.weight_stats(ttt_state)
            gate = torch.tanh(self.gate_alpha).abs()
            stats.update(eta_mean=lr.mean(), eta_min=lr.min(), eta_max=lr.max(), gate_mean_abs=gate.mean(),
                         gate_max_abs=gate.max())
            self._stats = stats

    # its window is its own: a stage only checks its mini-batch (not LocalStreamingAttention's window)
    configure_for_stage = VariantModule.configure_for_stage

    @property
    def layout_ttt_window(self) -> int:
        return int(self.memory_window)

    def rerun_frozen_matmul(self) -> int:
        """``project_qkv`` runs the frozen in-projection again, without RoPE, for the memory (one
        in-projection per token, whatever the per-step schedule; LoRA's own weights left out)."""
        return sum(p.numel() for p in self.in_projs[0].parameters() if p.dim() == 2 and not p.requires_grad)

    def opening_parameters(self) -> list[nn.Parameter]:
        """What opens the memory's path (gate, the read's own, inner-lr projection): the optimiser
        gives these their own LR scale and no weight decay."""
        return [self.gate_alpha, *self._read_parameters(), self.lr_proj.weight, self.lr_proj.bias]

    def health(self) -> dict[str, float]:
        return {**{k: float(v) for k, v in self._stats.items()}, **self.gate_health()}


class AddReadAttention(CacheReplacementAttention):
    """``add``: the memory read, normalised and projected (zero-initialised) and gated per channel,
    is added to the attention output."""

    memory_read = "add"

    def _init_read(self, cfg: TTTConfig, device: torch.device) -> None:
        self.read_norm = nn.LayerNorm(self.embed_dim, device=device)
        self.read_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False, device=device)
        nn.init.zeros_(self.read_proj.weight)
        self.gate_alpha = nn.Parameter(torch.full((self.embed_dim,), float(cfg.gate_init), device=device))

    def forward_with_ttt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        attn = self.forward_without_ttt(query, key, value)
        return attn + self._memory_update(query)

    def _memory_update(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_conversation(x, self._gated_read)

    def _gated_read(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        read, _ = self._lagged_read(*self._memory_inputs(x))
        read = read.transpose(1, 2).reshape(B, T, self.embed_dim)
        out = self.read_proj(self.read_norm(read.to(self.read_norm.weight.dtype)))
        return (torch.tanh(self.gate_alpha) * out).to(x.dtype)

    def _read_parameters(self) -> list[nn.Parameter]:
        return [self.read_proj.weight]


class KVSlotsAttention(CacheReplacementAttention):
    """``kv_slots``: content-addressed. Each query gets one virtual key/value slot of its own, whose
    value is the memory read at that query, ``r = s_h f_W(q_t)`` (the same lagged read as ``add``:
    only what left the window; ``s_h`` a per-head scale from 1), and whose logit is learned,
    ``c_h + q_t . (u_h + K_h f_W(q_t)) / sqrt(d)``: a per-head bias, a learned key match, and a key
    made from the slot's own read (``u``, ``K`` from zero), so a query can claim its slot when the
    memory holds something that answers it. The slot sits in the same softmax as the recent keys,
    one normaliser over both (LoLCATs' window + linear attention; Titans' memory as context):
    ``o_J = (1 - beta) o_L + beta r`` with ``beta = sigmoid(logit - lse_L)``, ``lse_L`` the
    log-sum-exp of the window's scores. The layer returns ``o_L + tanh(g_h) (o_J - o_L)`` per head,
    g from 0: step 0 is the frozen base, and g's gradient (``beta (r - o_L)``) is non-zero, so it
    opens as the slot proves useful. ``c`` starts at log(window): a flat window and the slot then
    share the softmax about evenly, so the gate's gradient is not starved. The scale lets the slot
    hand on a value as strong as the window's sharp lookups: a delta-rule read of a pair written
    among many frames comes back shrunk (in the memory proof about half the norm of the frozen
    attention's output at the same lookup), and the convex mix alone cannot restore it."""

    memory_read = "kv_slots"

    def _init_read(self, cfg: TTTConfig, device: torch.device) -> None:
        head_dim = self.embed_dim // self.num_heads
        self.slot_bias = nn.Parameter(torch.full((self.num_heads,), math.log(self.read_lag * cfg.mini_batch_size),
                                                 device=device))
        self.slot_key = nn.Parameter(torch.zeros(self.num_heads, head_dim, device=device))
        self.slot_read_key = nn.Parameter(torch.zeros(self.num_heads, head_dim, head_dim, device=device))
        self.slot_scale = nn.Parameter(torch.ones(self.num_heads, device=device))
        self.gate_alpha = nn.Parameter(torch.zeros(self.num_heads, device=device))
        self._slot_share: torch.Tensor | None = None

    def forward_with_ttt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self._streaming_state is not None:
            return torch.cat([self._slots_step(query[:, t : t + 1]) for t in range(query.shape[1])], dim=1)
        return self._per_conversation(query, self._slots_forward)

    def _joint(self, o_local: torch.Tensor, lse: torch.Tensor, read: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Window attention o_L [B, H, T, D] (log-sum-exp ``lse`` [B, H, T]) and each query's own
        memory slot (value ``s_h read``, logit ``c_h + q . (u_h + K_h read) / sqrt(d)``) under one
        softmax, gated per head: ``o_L + tanh(g) (o_J - o_L)``."""
        compute = torch.promote_types(o_local.dtype, torch.float32)
        value, beta = self.memory_slot(read, q, lse, compute)
        beta = beta[..., None]
        gate = torch.tanh(self.gate_alpha).to(compute).view(1, -1, 1, 1)
        o = o_local.to(compute)
        self._slot_share = beta.detach().mean()
        return (o + gate * beta * (value - o)).to(o_local.dtype)

    def memory_slot(self, read: torch.Tensor, q: torch.Tensor, lse: torch.Tensor,
                    compute: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's slot: its value ``s_h read`` [B, H, T, D] and its share of the softmax
        beside a window of log-sum-exp ``lse``, ``beta`` [B, H, T] (also what diagnostics report)."""
        d = q.shape[-1]
        read = read.to(compute)
        value = read * self.slot_scale.to(compute).view(1, -1, 1, 1)
        key = self.slot_key.to(compute)[None, :, None] + read @ self.slot_read_key.to(compute)[None]  # [B, H, T, D]
        logit = self.slot_bias.to(compute).view(1, -1, 1) + (q.to(compute) * key).sum(-1) * d ** -0.5
        return value, torch.sigmoid(logit - lse.to(compute))

    def _slots_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward of one whole conversation batch [B, T, C]."""
        B = x.shape[0]
        q0, k0, v, lr, log_decay = self._memory_inputs(x)
        read, nq = self._lagged_read(q0, k0, v, lr, log_decay)
        if self.rope is not None:
            q, k = self.rope(q0, k0, torch.zeros(B, device=x.device, dtype=torch.long), time_before_heads=False)
        else:
            q, k = q0, k0
        o_local, lse = local_attention(q, k, v, self.window, chunk_size=self.local_chunk_size, return_lse=True,
                                       backend=self.local_backend)
        return self.project_out(self._joint(o_local, lse, read, nq))

    def _slots_step(self, x: torch.Tensor) -> torch.Tensor:
        """One streamed frame [B, 1, C]: write/read the memory, attend the ring cache, merge the slot."""
        state = self._streaming_state
        q0, k0, v, lr, log_decay = self._memory_inputs(x)
        read, nq = self._lagged_read(q0, k0, v, lr, log_decay)
        offset = state.offset
        q, k = self.rope(q0, k0, offset, time_before_heads=False) if self.rope is not None else (q0, k0)
        keys, values, pos_k = self._complete_kv(k, v)
        delta = offset.view(-1, 1) - pos_k  # [B, K]
        visible = ((pos_k >= 0) & (delta >= 0) & (delta < self.context))[:, None, None]  # [B, 1, 1, K]
        compute = torch.promote_types(q.dtype, torch.float32)
        scores = q.to(compute) @ keys.to(compute).transpose(-1, -2) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, 1]
        o_local = torch.exp(scores - lse[..., None]) @ values.to(compute)
        out = self._joint(o_local, lse, read, nq).to(v.dtype)
        state.offset[:] = torch.where(state.exec_mask, state.offset + 1, state.offset)
        state.offset_cpu += 1
        return self.project_out(out)

    def _read_parameters(self) -> list[nn.Parameter]:
        return [self.slot_bias, self.slot_key, self.slot_read_key, self.slot_scale]

    def health(self) -> dict[str, float]:
        stats = super().health()  # the gate is per head
        with torch.no_grad():
            stats["slot_bias_mean"] = float(self.slot_bias.float().mean())
            stats["slot_scale_mean"] = float(self.slot_scale.float().mean())
            if self._slot_share is not None:
                stats["slot_share_mean"] = float(self._slot_share)
        return stats


#: ``ttt.memory_read`` -> the attention that reads the memory so
MEMORY_READS: dict[str, type[CacheReplacementAttention]] = {cls.memory_read: cls
                                                            for cls in (AddReadAttention, KVSlotsAttention)}


@register
class CacheReplacement(Variant):
    name = "cache_replacement"
    order = 40

    def check(self) -> None:
        if self.settings.memory_read not in MEMORY_READS:
            raise bad("ttt.memory_read", self.settings.memory_read, f"one of {', '.join(MEMORY_READS)}")

    def attention_window(self) -> int:
        """The memory's lag window: ``(ceil(W / b) + 1) * b``, W = ttt.ttt_layer_attention_window."""
        b = int(self.settings.ttt_layer.resolved().mini_batch_size)
        return read_lag(int(self.settings.ttt_layer_attention_window), b) * b

    def install(self, layer: StreamingTransformerLayer, name: str, ctx: InstallContext
                ) -> tuple[nn.Module, VariantModule]:
        s = self.settings
        read = MEMORY_READS[s.memory_read]  # check() refused any other
        attn = read.from_moshi_with_memory(layer.self_attn, int(s.ttt_layer_attention_window), s.ttt_layer, name,
                                           chunk_size=ctx.chunk_size, backend=ctx.backend,
                                           key_adapter=s.memory_key_adapter)
        return layer, attn  # the layer stays; its attention now carries the memory

    @classmethod
    def context_message(cls, name: str, window: str, where: str, wraps: int, ttt_window: int | None) -> str:
        return (f"{name}: local window {window} (ttt.ttt_layer_attention_window={ttt_window}); frames that leave it "
                "are written into the layer's TTT memory (not lost)")
