"""The fast-weight memory as a module: learned initial weights, inner LayerNorm, learning rates.

It is written by one of two rules (``ttt.ttt_layer.rule``): ``delta``, a write every frame computed
chunkwise (``moshi_ttt.ttt.delta``, or flash-linear-attention's kernels on CUDA), or
``minibatch_gd``, Sun et al.'s gradient step per mini-batch (``moshi_ttt.ttt.scan``). Both keep the
same state (fast weights W, b; the delta rule's memory matrix is S = [W; b] for keys [k, 1]).

``TTTMemory`` knows nothing about where its queries, keys and values come from: ``TTTLayer``
projects them from one stream (self-read, ``read_lag=0``), and a cache-replacement variant can
write the keys/values that leave its attention window and read with its own queries at a lag.
Its forward takes a chunk of any length plus the state, and the outputs do not depend on how
a stream is cut into chunks: buffered tokens are prepended, so the scan always starts on a
mini-batch boundary, and only the mini-batches no later read needs intact are written.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from moshi_ttt.ttt import fla_kernels
from moshi_ttt.ttt.config import TTTConfig, config_key
from moshi_ttt.ttt.delta import chunk_delta_rule, delta_rule_read
from moshi_ttt.ttt.inner import layer_norm, make_inner
from moshi_ttt.ttt.scan import ttt_scan
from moshi_ttt.ttt.state import TTTState

Tensor = torch.Tensor


def inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """The inner loop accumulates in fp32 (fp64 stays fp64), whatever the autocast dtype."""
    return torch.promote_types(dtype, torch.float32)


#: Initial bias c of the decay projection, a_t = exp(-softplus(x . w + c)): a_t ~ 0.9997 at the start.
DECAY_BIAS_INIT = -8.0


class TTTMemory(nn.Module):
    """H heads of fast weights trained on xk -> xv and read with xq.

    Parameters: the initial fast weights (``initial``); for ``minibatch_gd`` the per-head LayerNorm
    of f(x) = x + LN(g(x)) and (``per_position_lr``) offsets on the 1/(i+1) position factors.

    Args:
        config: the layer's settings (``ttt.ttt_layer``), rule defaults already filled in.
        head_dim: width of one head's keys, values and queries.
        read_lag: 0 for a causal self-read; L >= 1 (in writes: frames for the delta rule, mini-batches
            for minibatch_gd): a query reads only what was written L writes before its own.
    """

    def __init__(self, config: TTTConfig, head_dim: int, read_lag: int = 0):
        super().__init__()
        if read_lag < 0:
            raise ValueError(f"read_lag={read_lag} must be >= 0")
        config = config.resolved()
        self.config = config
        self.head_dim = head_dim
        self.read_lag = read_lag
        self.rule = config.rule
        self.mini_batch_size = int(config.mini_batch_size)  # 1 for the delta rule (its config check)
        self.inner = make_inner(config.inner, head_dim, config.mlp_expansion)
        H = config.num_heads
        self.initial = nn.ParameterDict(
            {k: nn.Parameter(v) for k, v in self.inner.init_weights(H, config.init_std).items()}
        )
        if config.inner_norm:
            self.ln_weight = nn.Parameter(torch.ones(H, head_dim))
            self.ln_bias = nn.Parameter(torch.zeros(H, head_dim))
        else:  # no LayerNorm in f: nothing to learn (kept as buffers so the scan's signature stays one)
            self.register_buffer("ln_weight", torch.ones(H, head_dim), persistent=False)
            self.register_buffer("ln_bias", torch.zeros(H, head_dim), persistent=False)
        per_position = config.per_position_lr and self.rule == "minibatch_gd"
        self.token_bias = nn.Parameter(torch.zeros(self.mini_batch_size)) if per_position else None

    @property
    def ln_eps(self) -> float | None:
        """The inner LayerNorm's epsilon; None when f has no LayerNorm (``inner_norm=false``)."""
        return self.config.ln_eps if self.config.inner_norm else None

    def token_eta(self, device=None, dtype=torch.float32) -> Tensor:
        """[b] factor of position i in a mini-batch: 1/(i+1) (+ learned offset, kept >= 0)."""
        base = 1.0 / torch.arange(1, self.mini_batch_size + 1, device=device, dtype=dtype)
        if self.token_bias is None:
            return base
        return (base + self.token_bias.to(dtype)).clamp_min(0.0)

    def eta(self, logits: Tensor) -> Tensor:
        """Per-token, per-head learning rate from gate logits, clamped: the delta rule's beta = base_lr *
        sigmoid (its keys have a fixed norm); minibatch_gd's eta = base_lr * sigmoid / head_dim."""
        c = self.config
        scale = c.base_lr if self.rule == "delta" else c.base_lr / self.head_dim
        return (scale * torch.sigmoid(logits)).clamp(c.eta_min, c.eta_max)

    def learning_rates(self, lr_proj: nn.Linear, x: Tensor) -> Tensor:
        """eta [B, H, T] of the stream x [B, T, dim] through the owner's ``lr_proj`` (dim -> H),
        in fp32 whatever the autocast dtype: the one lr -> eta path of every TTT module."""
        dtype = inner_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), lr_proj.weight.to(dtype), lr_proj.bias.to(dtype))
            return self.eta(logits).transpose(1, 2)

    @property
    def decay(self) -> bool:
        """The delta rule with a learned per-frame decay (``ttt.ttt_layer.decay``)."""
        return self.rule == "delta" and bool(self.config.decay)

    def make_decay_proj(self, dim: int) -> nn.Linear | None:
        """The owner's projection of its stream to per-head log-decays (None without decay): starts
        near a_t = 1, so a fresh memory forgets slowly."""
        if not self.decay:
            return None
        proj = nn.Linear(dim, self.config.num_heads)
        nn.init.normal_(proj.weight, std=self.config.init_std)
        nn.init.constant_(proj.bias, DECAY_BIAS_INIT)
        return proj

    def log_decays(self, decay_proj: nn.Linear | None, x: Tensor) -> Tensor | None:
        """log a [B, H, T] = -softplus(x . w + c) of the stream x [B, T, dim], fp32 (None without decay)."""
        if decay_proj is None:
            return None
        dtype = inner_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.to(dtype), decay_proj.weight.to(dtype), decay_proj.bias.to(dtype))
            return -F.softplus(logits).transpose(1, 2)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> TTTState:
        """Every sample at the learned initial weights, nothing buffered."""
        return TTTState.fresh(
            dict(self.initial.items()), batch_size, self.head_dim, device, inner_dtype(dtype), decay=self.decay
        )

    def forward(
        self, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, state: TTTState | None = None,
        log_decay: Tensor | None = None,
    ) -> tuple[Tensor, TTTState]:
        """Read xq [B, H, T, d] and write (xk, xv) [B, H, T, d] with learning rates lr [B, H, T] (the
        delta rule's beta) and, with decay, log-decays [B, H, T].

        Returns the reads [B, H, T, d] (fp32, or fp64 for fp64 inputs: xq + LN(g(xq; W)) for
        minibatch_gd, q^T S for the delta rule) and the new state. Autocast is off inside: the fast
        weights and their updates stay in fp32.
        """
        B, _, T, _ = xk.shape
        dtype = inner_dtype(xk.dtype)
        if self.decay != (log_decay is not None):
            raise ValueError(f"{config_key('decay')}={self.config.decay}: log_decay must be "
                             f"{'given' if self.decay else 'None'}")
        with torch.autocast(device_type=xk.device.type, enabled=False):
            xq, xk, xv, lr = (t.to(dtype) for t in (xq, xk, xv, lr))
            if log_decay is not None:
                log_decay = log_decay.to(dtype)
            if state is None:
                state = self.init_state(B, xk.device, dtype)
            if state.batch_size != B:
                raise ValueError(f"TTT state holds {state.batch_size} samples, input has {B}")
            by_length: dict[int, list[int]] = {}
            for i, n in enumerate(state.lengths):
                by_length.setdefault(n, []).append(i)
            if len(by_length) == 1:
                out, new = self._run(state, xq, xk, xv, lr, log_decay)
            else:  # samples reset mid-stream sit at other mini-batch phases: one scan per phase
                order = [i for idx in by_length.values() for i in idx]
                parts = []
                for idx in by_length.values():
                    t = torch.tensor(idx, device=xk.device)
                    sel = [x.index_select(0, t) for x in (xq, xk, xv, lr)]
                    sel.append(None if log_decay is None else log_decay.index_select(0, t))
                    parts.append(self._run(state.select(idx), *sel))
                inverse = torch.argsort(torch.tensor(order)).tolist()
                out = torch.cat([p[0] for p in parts]).index_select(
                    0, torch.tensor(inverse, device=xk.device)
                )
                new = TTTState.cat([p[1] for p in parts]).select(inverse)
        return out, replace(new, positions=tuple(p + T for p in state.positions))

    def _run(
        self, state: TTTState, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, log_decay: Tensor | None = None
    ) -> tuple[Tensor, TTTState]:
        """One scan for samples that share a buffer length (so mini-batch boundaries line up)."""
        n = state.lengths[0]
        if n:
            xk = torch.cat([state.buf_k[:, :, :n], xk], dim=2)
            xv = torch.cat([state.buf_v[:, :, :n], xv], dim=2)
            lr = torch.cat([state.buf_lr[:, :, :n], lr], dim=2)
            if log_decay is not None:
                log_decay = torch.cat([state.buf_decay[:, :, :n], log_decay], dim=2)
        N, b = xk.shape[2], self.mini_batch_size
        # Mini-batches the next query's read no longer needs unwritten: all complete ones for
        # lag 0 and 1, all but the last lag-1 complete ones for a longer lag.
        num_commit = max(0, N // b - max(self.read_lag, 1) + 1)
        write = self._delta if self.rule == "delta" else self._minibatch_gd
        out, weights = write(state.weights, xq, xk, xv, lr, log_decay, n, num_commit)
        keep = num_commit * b
        new = replace(
            state,
            weights=weights,
            buf_k=xk[:, :, keep:],
            buf_v=xv[:, :, keep:],
            buf_lr=lr[:, :, keep:],
            buf_decay=None if log_decay is None else log_decay[:, :, keep:],
            lengths=(N - keep,) * xk.shape[0],
        )
        return out, new

    def _delta(self, weights: dict[str, Tensor], xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor,
               log_decay: Tensor | None, query_start: int, num_commit: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The delta rule on S = [W; b] with keys and queries [x, 1] (the bias is one more key row)."""
        c = self.config
        S = torch.cat([weights["W"], weights["b"]], dim=-2).to(xk.dtype)
        k1, q1 = (torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) for x in (xk, xq))
        out, S = delta_rule_read(
            q1, k1, xv, lr, S, log_decay, read_lag=self.read_lag, query_start=query_start, num_commit=num_commit,
            chunk_size=c.chunk_size, checkpoint_group_size=c.checkpoint_group_size,
            engine=self._engine(xk.device, xk.dtype))
        return out, {"W": S[..., :-1, :], "b": S[..., -1:, :]}

    def _engine(self, device: torch.device, dtype: torch.dtype):
        """The delta rule's chunk engine for this call (``ttt.ttt_layer.kernel``); logs the choice once."""
        kernel = self.config.kernel
        if kernel == "torch":
            return chunk_delta_rule
        reason = fla_kernels.unavailable_reason(device, dtype, self.head_dim + 1, self.read_lag, self.decay)
        if reason is None:
            fla_kernels.log_once(f"delta rule: flash-linear-attention kernels ({config_key('kernel')}={kernel}) on "
                                 f"{device}, bf16 chunks, fp32 state")
            return fla_kernels.fla_chunk_delta_rule
        if kernel == "fla":
            raise RuntimeError(f"{config_key('kernel')}=fla cannot run here: {reason}")
        fla_kernels.log_once(f"delta rule: plain-torch engine ({config_key('kernel')}=auto): {reason}")
        return chunk_delta_rule

    def _minibatch_gd(self, weights: dict[str, Tensor], xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor,
                      log_decay: Tensor | None, query_start: int, num_commit: int
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sun et al.'s rule: the dual-form scan over mini-batches."""
        c, b, dtype = self.config, self.mini_batch_size, xk.dtype
        return ttt_scan(
            self.inner,
            {k: w.to(dtype) for k, w in weights.items()},
            xq,
            xk,
            xv,
            lr,
            self.token_eta(xk.device, dtype),
            self.ln_weight.to(dtype),
            self.ln_bias.to(dtype),
            mini_batch_size=b,
            read_lag=self.read_lag,
            query_start=query_start,
            num_commit=num_commit,
            weight_clip=c.weight_norm_clip,
            checkpoint_group_size=c.checkpoint_group_size,
            ln_eps=self.ln_eps,
            residual=c.inner_residual,
        )

    def read(self, weights: dict[str, Tensor], xq: Tensor) -> Tensor:
        """xq + LN(g(xq; W)) (without ``inner_residual``: LN(g(xq; W))) for queries [B, H, n, d] against
        given fast weights [B, H, ...]: what the scan returns for a lagged read, for callers that hold
        the weights themselves."""
        dtype = inner_dtype(xq.dtype)
        with torch.autocast(device_type=xq.device.type, enabled=False):
            xq = xq.to(dtype)
            z = self.inner.forward({k: w.to(dtype) for k, w in weights.items()}, xq)
            ln = (self.ln_weight.to(dtype)[None, :, None, :], self.ln_bias.to(dtype)[None, :, None, :],
                  self.ln_eps)
            read = layer_norm(z, ln)
            return xq + read if self.config.inner_residual else read

    @torch.no_grad()
    def weight_stats(self, state: TTTState) -> dict[str, Tensor]:
        """Fast-weight matrix statistics of a state (0-dim tensors; no device sync here)."""
        mats = [w.float() for k, w in state.weights.items() if k.startswith("W")]
        sq = sum(m.flatten(2).pow(2).sum(-1) for m in mats)  # [B, H]
        flat = torch.cat([m.flatten() for m in mats])
        return {
            "fast_weight_norm": sq.sqrt().mean(),
            "fast_weight_norm_max": sq.sqrt().max(),
            "fast_weight_mean": flat.mean(),
            "fast_weight_std": flat.std(),
        }
