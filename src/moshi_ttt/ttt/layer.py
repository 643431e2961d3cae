"""Multi-head TTT layer: projections, learned inner learning rate, memory, gate.

Returns the gated update tanh(alpha) * out_proj(post_norm(TTT(x))) so a caller adds it to its
residual stream. With alpha at 0.1 and the output projection at zero, an inserted layer starts
by (almost) not changing the frozen model it sits in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moshi_ttt.ttt.config import TTTConfig, config_key
from moshi_ttt.ttt.guard import check_finite
from moshi_ttt.ttt.memory import TTTMemory
from moshi_ttt.ttt.state import TTTState

Tensor = torch.Tensor


class TTTLayer(nn.Module):
    """TTT layer (Sun et al., 2024) over [B, T, dim] with explicit per-sample state.

    XQ, XK, XV are linear projections of x per head; eta = base_lr * sigmoid(x . w_h + b_h) / d per
    head and token. The memory reconstructs XV - XK from XK and is read with XQ, causally.
    """

    def __init__(self, config: TTTConfig, dim: int, name: str = "ttt"):
        super().__init__()
        config = config.resolved()
        self.config = config
        self.dim = dim
        self.name = name
        self.num_heads = H = config.num_heads
        self.head_dim = d = config.resolve_head_dim(dim)
        inner_width = H * d
        if not config.output_proj and inner_width != dim:
            raise ValueError(
                f"{config_key('output_proj')}=false needs num_heads * head_dim = {inner_width} to equal the "
                f"model dim {dim}"
            )
        std = config.init_std
        self.q_proj = nn.Linear(dim, inner_width, bias=False)
        self.k_proj = nn.Linear(dim, inner_width, bias=False)
        self.v_proj = nn.Linear(dim, inner_width, bias=False)
        self.lr_proj = nn.Linear(dim, H)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.lr_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.zeros_(self.lr_proj.bias)
        self.memory = TTTMemory(config, d, read_lag=0)
        self.decay_proj = self.memory.make_decay_proj(dim)  # the delta rule's forgetting (ttt.ttt_layer.decay)
        self.post_norm = nn.LayerNorm(inner_width)
        self.out_proj = nn.Linear(inner_width, dim, bias=False) if config.output_proj else None
        if self.out_proj is not None:
            nn.init.zeros_(self.out_proj.weight)
        self.gate_alpha = nn.Parameter(torch.full((dim,), float(config.gate_init)))
        self._stats: dict[str, Tensor] = {}

    def init_state(self, batch_size: int, device=None) -> TTTState:
        """A fresh state at the learned initial weights (call at each new conversation)."""
        device = device if device is not None else self.gate_alpha.device
        return self.memory.init_state(batch_size, device, self.gate_alpha.dtype)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState]:
        """x [B, T, dim] -> (gated update [B, T, dim] in x's dtype, new state)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TTT layer {self.name!r} expects [B, T, {self.dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        positions = state.positions if state is not None else (0,) * B
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if self.config.qk_l2_norm:
                q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            lr = self.memory.learning_rates(self.lr_proj, x)  # [B, H, T]
            log_decay = self.memory.log_decays(self.decay_proj, x)
            out, new_state = self.memory(q, k, v, lr, state, log_decay)
            out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
            if self.config.nan_guard:
                check_finite(self.name, out, x, positions, new_state.weights, self.memory.rule)
        out = self.post_norm(out.to(self.post_norm.weight.dtype))
        if self.out_proj is not None:
            out = self.out_proj(out)
        gate = torch.tanh(self.gate_alpha)
        y = (gate * out).to(x.dtype)
        self._record(x, y, lr, gate, new_state, log_decay)
        return y, new_state

    @torch.no_grad()
    def _record(self, x: Tensor, y: Tensor, lr: Tensor, gate: Tensor, state: TTTState,
                log_decay: Tensor | None = None) -> None:
        stats = self.memory.weight_stats(state)
        if lr.numel():
            stats.update(eta_mean=lr.mean(), eta_min=lr.min(), eta_max=lr.max())
            if log_decay is not None:
                stats["decay_mean"] = log_decay.exp().mean()
        stats["gate_mean_abs"] = gate.abs().mean()
        stats["out_in_norm_ratio"] = y.float().norm() / x.float().norm().clamp_min(1e-12)
        self._stats = stats

    def health(self) -> dict[str, float]:
        """Statistics of the last forward, as floats for a logger (syncs the device once)."""
        return {k: float(v) for k, v in self._stats.items()}
