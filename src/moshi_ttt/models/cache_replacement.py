"""``cache_replacement``: attention keeps a short recent window; what leaves it goes to a TTT memory.

The layer's own keys and values (before RoPE, L2-normalised keys) are written, in order, into a
fast-weight memory that learns k -> v; the layer's queries read it. A query at frame t may only
see what has left the window: with mini-batches of b frames the memory is read with a lag of
``L = ceil(W / b) + 1`` mini-batches (the scan writes mini-batch j and, in the same step, serves
the queries of mini-batch j + L; no per-step copy of the fast weights is kept). The attention
window is ``L * b`` frames, so every past frame is always in the window or in the memory (a few
recent-enough frames are in both). Read mode ``add``: the memory read, normalised and projected
(zero-initialised) and gated, is added to the attention output.

Read mode ``kv_slots``: M learned probe points (M <= b, per head) read the memory once per
mini-batch; the reads are the values of M virtual key/value slots (learned keys, rotated by
RoPE to the start of the mini-batch so they sit "here and now") that every query of the
mini-batch attends in the same softmax as its recent keys. The joint attention o_J is mixed
with the window-only attention o_L as ``o_L + tanh(g_h) (o_J - o_L)`` per head, g starting at 0:
at step 0 the layer is the frozen base, and g's gradient (beta (o_slots - o_L), beta the
slots' share of the softmax) is non-zero, so it opens as training finds the slots useful.
It costs a second local attention (chunked by b) in these layers. Packed conversations run
this layer once per conversation (attention and memory), as inference would.

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

from moshi_ttt.models.attention import LocalStreamingAttention, local_attention
from moshi_ttt.models.segments import current_segments, per_segment
from moshi_ttt.ttt import TTTConfig, TTTMemory, TTTState

MEMORY_READS = ("add", "kv_slots")


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
                               backend: str = "sdpa", memory_slots: int | None = None) -> CacheReplacementAttention:
        if memory_read not in MEMORY_READS:
            raise ValueError(f"ttt.memory_read={memory_read!r} must be one of {MEMORY_READS}")
        if window < 1:
            raise ValueError(f"ttt.window={window} must be >= 1")
        b = int(ttt_config.mini_batch_size)
        slots = b if memory_slots is None else int(memory_slots)
        if memory_read == "kv_slots" and not 1 <= slots <= b:
            raise ValueError(f"ttt.memory_slots={memory_slots} must lie in [1, ttt.layer.mini_batch_size={b}] "
                             "(the slots are read once per mini-batch, one probe per position)")
        lag = math.ceil(window / b) + 1
        module = LocalStreamingAttention.from_moshi(module, lag * b, chunk_size, backend)
        module.__class__ = cls
        module.fixed_window = True
        module._init_memory(ttt_config, name, lag, window, memory_read, slots)
        return module

    def _init_memory(self, cfg: TTTConfig, name: str, lag: int, window: int, memory_read: str,
                     slots: int) -> None:
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
        if memory_read == "add":
            self.read_norm = nn.LayerNorm(self.embed_dim, device=device)
            self.read_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=False, device=device)
            nn.init.zeros_(self.read_proj.weight)
            self.gate_alpha = nn.Parameter(torch.full((self.embed_dim,), float(cfg.gate_init), device=device))
        else:  # kv_slots
            self.num_slots = slots
            self.slot_probes = nn.Parameter(torch.randn(self.num_heads, slots, head_dim, device=device))
            self.slot_keys = nn.Parameter(torch.randn(self.num_heads, slots, head_dim, device=device) * cfg.init_std)
            self.gate_alpha = nn.Parameter(torch.zeros(self.num_heads, device=device))
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
        q, k, v, lr = self._memory_inputs(x)  # pre-RoPE: content only, the memory is position-free
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            q, k, v = F.normalize(q.to(dtype), dim=-1), F.normalize(k.to(dtype), dim=-1), v.to(dtype)
            read, new_state = self.memory(q, k, v, lr, state.ttt if state is not None else None)
        if state is not None:
            state.ttt = new_state
        read = read.transpose(1, 2).reshape(B, T, self.embed_dim)
        out = self.read_proj(self.read_norm(read.to(self.read_norm.weight.dtype)))
        self._record_stats(new_state, lr)
        return (torch.tanh(self.gate_alpha) * out).to(x.dtype)

    # ---- kv_slots ------------------------------------------------------------------------
    def _memory_inputs(self, x: torch.Tensor):
        """Pre-RoPE (q, k, v) [B, H, T, D] and the memory's per-token learning rates [B, H, T]."""
        q, k, v = self.project_qkv(x, rope=False)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            logits = F.linear(x.to(dtype), self.lr_proj.weight.to(dtype), self.lr_proj.bias.to(dtype))
            lr = self.memory.eta(logits).transpose(1, 2)
        return q, k, v, lr

    def _probes(self, dtype: torch.dtype) -> torch.Tensor:
        return F.normalize(self.slot_probes.to(dtype), dim=-1)  # the memory's keys are unit vectors

    def _rotate_slot_keys(self, block_start: torch.Tensor) -> torch.Tensor:
        """Slot keys [B, H, N, M, D] rotated by RoPE to each block's first position ``block_start``
        [B, N], so they sit at distance 0..b-1 from every query of their block."""
        B, N = block_start.shape
        H, M, D = self.slot_keys.shape
        keys = self.slot_keys[None, :, None].expand(B, H, N, M, D)
        if self.rope is None:
            return keys
        flat = keys.permute(0, 2, 3, 1, 4).reshape(B * N * M, H, 1, D)
        offsets = block_start.reshape(B * N, 1).expand(B * N, M).reshape(-1)
        flat, _ = self.rope(flat, flat, offsets, time_before_heads=False)
        return flat.reshape(B, N, M, H, D).permute(0, 3, 1, 2, 4)

    def _gated_heads(self, o_local: torch.Tensor, o_joint: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.gate_alpha).to(o_local.dtype).view(1, -1, 1, 1)
        return o_local + gate * (o_joint - o_local)

    def _slots_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward of one whole conversation batch [B, T, C] in kv_slots mode."""
        B, T, _ = x.shape
        b, M = self.memory.mini_batch_size, self.num_slots
        q0, k0, v, lr = self._memory_inputs(x)
        # the memory is written with the keys/values and read at the probes: position n*b + m reads
        # probe m with the weights that block n sees; padded to whole blocks so the last one has all
        pad = -T % b
        N = (T + pad) // b
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            wk = F.pad(F.normalize(k0.to(dtype), dim=-1), [0, 0, 0, pad])
            wv, lr = F.pad(v.to(dtype), [0, 0, 0, pad]), F.pad(lr, [0, pad])
            probes = F.pad(self._probes(dtype), [0, 0, 0, b - M])  # [H, b, D]: positions >= M read nothing
            xq = probes[None, :, None].expand(B, -1, N, -1, -1).reshape(B, self.num_heads, N * b, -1)
            reads, state = self.memory(xq, wk, wv, lr)
        slot_v = reads.reshape(B, self.num_heads, N, b, -1)[:, :, :, :M].to(v.dtype)
        starts = (torch.arange(N, device=x.device) * b).expand(B, N)
        slot_k = self._rotate_slot_keys(starts).to(k0.dtype)
        if self.rope is not None:
            q, k = self.rope(q0, k0, torch.zeros(B, device=x.device, dtype=torch.long), time_before_heads=False)
        else:
            q, k = q0, k0
        o_local = local_attention(q, k, v, self.window, chunk_size=self.local_chunk_size, backend=self.local_backend)
        o_joint = local_attention(q, k, v, self.window, chunk_size=b, prefix_k=slot_k, prefix_v=slot_v,
                                  backend=self.local_backend)
        self._record_stats(state, lr)
        return self.project_out(self._gated_heads(o_local, o_joint))

    def _slots_step(self, x: torch.Tensor) -> torch.Tensor:
        """One streamed frame [B, 1, C]: write the memory, read the slots, attend ring cache + slots."""
        state = self._streaming_state
        B = x.shape[0]
        b, M = self.memory.mini_batch_size, self.num_slots
        q0, k0, v, lr = self._memory_inputs(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            probes = self._probes(dtype)
            phase = torch.tensor([p % b for p in state.ttt.positions], device=x.device)
            xq = F.pad(probes, [0, 0, 0, b - M])[:, phase].transpose(0, 1)[:, :, None]  # [B, H, 1, D]
            # the weights before this frame's write are the ones its block reads (after block n - L)
            slot_v = self.memory.read(state.ttt.weights, probes[None].expand(B, -1, -1, -1))
            _, state.ttt = self.memory(xq, F.normalize(k0.to(dtype), dim=-1), v.to(dtype), lr, state.ttt)
        offset = state.offset
        slot_k = self._rotate_slot_keys((offset // b * b)[:, None])[:, :, 0].to(k0.dtype)  # [B, H, M, D]
        q, k = self.rope(q0, k0, offset, time_before_heads=False) if self.rope is not None else (q0, k0)
        keys, values, pos_k = self._complete_kv(k, v)
        delta = offset.view(-1, 1) - pos_k  # [B, K]
        visible = ((pos_k >= 0) & (delta >= 0) & (delta < self.context))[:, None, None]  # [B, 1, 1, K]
        scale = q.shape[-1] ** -0.5
        compute = torch.promote_types(q.dtype, torch.float32)
        s_local = (q.to(compute) @ keys.to(compute).transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        s_slots = q.to(compute) @ slot_k.to(compute).transpose(-1, -2) * scale
        o_local = torch.softmax(s_local, dim=-1) @ values.to(compute)
        joint = torch.softmax(torch.cat([s_slots, s_local], dim=-1), dim=-1)
        o_joint = joint @ torch.cat([slot_v.to(compute), values.to(compute)], dim=2)
        out = self._gated_heads(o_local, o_joint).to(v.dtype)
        state.offset[:] = torch.where(state.exec_mask, state.offset + 1, state.offset)
        state.offset_cpu += 1
        self._record_stats(state.ttt, lr)
        return self.project_out(out)

    def _record_stats(self, ttt_state: TTTState, lr: torch.Tensor) -> None:
        with torch.no_grad():
            stats = self.memory.weight_stats(ttt_state)
            stats.update(eta_mean=lr.mean(), eta_min=lr.min(), eta_max=lr.max(),
                         gate_mean_abs=torch.tanh(self.gate_alpha).abs().mean())
            self._stats = stats

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self.memory_read == "kv_slots" and self.ttt_enabled:
            if self._streaming_state is not None:
                return torch.cat([self._slots_step(query[:, t : t + 1]) for t in range(query.shape[1])], dim=1)
            segments = current_segments()
            if segments is not None:
                return per_segment(query, segments, self._slots_forward)
            return self._slots_forward(query)
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
