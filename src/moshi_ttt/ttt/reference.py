"""What a TTT layer computes, written plainly: the reference the fast code is tested against.

The layer keeps, per sample and head, fast weights W of an inner model g (``linear``:
g(x) = x W + b; ``mlp``: g(x) = GELU(x W1 + b1) W2 + b2) and reads them through
f(x; W) = x + LN(g(x; W)). Tokens arrive in mini-batches of b. For one head:

1. Project the stream: q, k, v = x Wq, x Wk, x Wv (q and k L2-normalised with
   ``qk_l2_norm``); a learning rate per token lr_j = clamp(base_lr * sigmoid(x_j . w + c) / d,
   eta_min, eta_max) (``TTTMemory.learning_rates``; the delta rule's has no 1 / d).
2. Self-supervised inner loss of token j: l_j(W) = 0.5 * ||LN(g(k_j; W)) - (v_j - k_j)||^2,
   i.e. f(k_j; W) should reconstruct v_j (``inner_residual=false``: f = LN(g), target v_j, and
   the reads below drop the q_i term).
3. Inside a mini-batch every gradient is taken at the weights W0 the mini-batch starts from.
   Position i reads with W_i = W0 - sum_{j <= i} tok_i * lr_j * grad l_j(W0), tok_i = 1/(i+1)
   (+ a learned offset, kept >= 0, with ``per_position_lr``): out_i = q_i + LN(g(q_i; W_i)).
4. When the mini-batch is full, W becomes its last position's weights W_{b-1} (then clipped to
   Frobenius norm ``weight_norm_clip`` per tensor, if set). A partial last mini-batch is read,
   never written.
5. The layer output is tanh(alpha) * out_proj(post_norm(concat of the heads)).

``read_lag=L >= 1`` (the cache-replacement memory) reads a separate query stream: queries of
mini-batch m use the weights after mini-batch m - L was written (the initial ones before).

The delta rule (``rule=delta``) is the same memory written every frame, with neither LayerNorm nor
residual: S = [W; b] and k = [key, 1], frame t writes S <- a_t S + beta_t k_t (v_t - a_t S^T k_t)
(a_t = 1 without decay; beta_t = lr_t) and the query of frame t reads [q_t, 1]^T S after frame t
(``read_lag=L``: after frame t - L). ``reference_delta_head`` writes it out token by token; at
mini-batch 1 without LayerNorm and residual it is step 3 above with b = 1.

The fast paths (``ttt.scan.ttt_scan`` with ``ttt.inner``'s dual form; ``ttt.delta``'s chunks)
compute exactly this without ever building W_i; this module builds every W_i with torch.autograd.grad, loops over
samples, heads and tokens, and is slow on purpose: use it for tests and for reading, never to
train. ``tests/test_ttt_layer.py`` compares the two in float64 to 1e-8, gradients included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moshi_ttt.ttt.config import config_key

Tensor = torch.Tensor
Weights = dict[str, Tensor]


def inner_g(kind: str, w: Weights, x: Tensor) -> Tensor:
    """g(x; W) of one head: ``linear`` x W + b, ``mlp`` GELU(x W1 + b1) W2 + b2 (exact GELU)."""
    if kind == "linear":
        return x @ w["W"] + w["b"]
    if kind == "mlp":
        return F.gelu(x @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]
    raise ValueError(f"{config_key('inner')}={kind!r} must be 'linear' or 'mlp'")


def clip(w: Weights, max_norm: float | None) -> Weights:
    """Scale each tensor of one head's weights down to Frobenius norm <= max_norm (None: off)."""
    if max_norm is None:
        return w
    return {k: t * (max_norm / torch.clamp(t.norm(), min=max_norm)) for k, t in w.items()}


def position_factors(memory) -> Tensor:
    """tok_i of a ``TTTMemory`` [b]: 1/(i+1), plus the learned offset (kept >= 0) if any."""
    base = 1.0 / torch.arange(1, memory.mini_batch_size + 1, dtype=memory.ln_weight.dtype)
    return base if memory.token_bias is None else (base + memory.token_bias).clamp_min(0.0)


def reference_head(
    kind: str,
    w0: Weights,
    ln_w: Tensor,
    ln_b: Tensor,
    eps: float | None,
    tok: Tensor,
    b: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    lag: int = 0,
    max_norm: float | None = None,
    residual: bool = True,
) -> Tensor:
    """Reads [T, d] of one head of one sample, steps 2-4 above, token by token.

    ``w0``: the initial weights (name -> tensor without batch/head axes); ``q``, ``k``, ``v``
    [T, d]; ``lr`` [T]; ``tok`` [b]; ``lag``: the read lag in mini-batches (0: causal self-read).
    """
    T = k.shape[0]
    q_skip = q if residual else torch.zeros_like(q)  # f(x) = x + ... adds the input to every read
    target = v - k if residual else v

    def f_ln(z: Tensor) -> Tensor:
        return z if eps is None else F.layer_norm(z, (z.shape[-1],), ln_w, ln_b, eps)

    W, history, rows = dict(w0), [dict(w0)], []
    for m0 in range(0, T, b):
        idx = list(range(m0, min(m0 + b, T)))
        grads = []  # grad l_j(W0) for every token j of the mini-batch, at its start weights W0 = W
        for j in idx:
            loss = 0.5 * (f_ln(inner_g(kind, W, k[j : j + 1])) - target[j : j + 1]).pow(2).sum()
            grads.append(dict(zip(W, torch.autograd.grad(loss, list(W.values()), create_graph=True))))
        if lag == 0:  # position i reads W_i = W0 - tok_i * sum_{j <= i} lr_j * grad_j
            acc = {n: torch.zeros_like(t) for n, t in W.items()}
            for i in idx:
                acc = {n: acc[n] + lr[i] * grads[i - m0][n] for n in W}
                Wi = {n: W[n] - tok[i - m0] * acc[n] for n in W}
                rows.append(q_skip[i : i + 1] + f_ln(inner_g(kind, Wi, q[i : i + 1])))
        if len(idx) == b:  # a full mini-batch commits its last position's weights
            W = clip({n: W[n] - sum(tok[b - 1] * lr[j] * grads[j - m0][n] for j in idx) for n in W}, max_norm)
            history.append(W)
    if lag:  # mini-batch m reads the weights after mini-batch m - lag was written
        for i in range(T):
            Wr = history[max(0, i // b - lag + 1)]
            rows.append(q_skip[i : i + 1] + f_ln(inner_g(kind, Wr, q[i : i + 1])))
    return torch.cat(rows)


def reference_delta_head(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, S0: Tensor, log_decay: Tensor | None = None, lag: int = 0
) -> tuple[Tensor, Tensor]:
    """The delta rule for one head of one sample, frame by frame: (reads [T, V], final state [K, V]).

    ``q``, ``k`` [T, K] (the bias row already appended), ``v`` [T, V], ``beta`` [T], ``S0`` [K, V],
    ``log_decay`` [T] (None: no decay); ``lag``: the query of frame t reads S after frame t (0) or
    after frame t - lag (S0 before that)."""
    S, history = S0, [S0]  # history[n]: S after n frames
    for t in range(k.shape[0]):
        if log_decay is not None:
            S = torch.exp(log_decay[t]) * S
        S = S + beta[t] * torch.outer(k[t], v[t] - S.T @ k[t])
        history.append(S)
    rows = [q[t] @ history[t + 1 if lag == 0 else max(0, t - lag + 1)] for t in range(k.shape[0])]
    return (torch.stack(rows) if rows else v[:0]), S


def _delta_memory_head(memory, h: int, q: Tensor, k: Tensor, v: Tensor, lr: Tensor,
                       log_decay: Tensor | None) -> Tensor:
    """One head of a delta-rule ``TTTMemory`` from its initial weights (keys and queries get the bias row)."""
    S0 = torch.cat([memory.initial["W"][h], memory.initial["b"][h]], dim=0)
    one = q.new_ones(q.shape[0], 1)
    return reference_delta_head(torch.cat([q, one], -1), torch.cat([k, one], -1), v, lr, S0, log_decay,
                                memory.read_lag)[0]


def reference_memory(memory, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor,
                     log_decay: Tensor | None = None) -> Tensor:
    """What ``TTTMemory.forward`` returns for a fresh state: reads [B, H, T, d] from [B, H, T, d]
    streams, learning rates [B, H, T] (and the delta rule's log-decays), one sample and head at a time."""
    c = memory.config
    tok = position_factors(memory)
    out = []
    for s in range(xk.shape[0]):
        heads = []
        for h in range(xk.shape[1]):
            if c.rule == "delta":
                heads.append(_delta_memory_head(memory, h, xq[s, h], xk[s, h], xv[s, h], lr[s, h],
                                                None if log_decay is None else log_decay[s, h]))
                continue
            w0 = {n: p[h] for n, p in memory.initial.items()}
            heads.append(reference_head(
                c.inner, w0, memory.ln_weight[h], memory.ln_bias[h], memory.ln_eps, tok, memory.mini_batch_size,
                xq[s, h], xk[s, h], xv[s, h], lr[s, h], memory.read_lag, c.weight_norm_clip, c.inner_residual))
        out.append(torch.stack(heads))
    return torch.stack(out)


def reference_layer(layer, x: Tensor) -> Tensor:
    """What ``TTTLayer.forward`` returns for a fresh state: [B, T, dim] -> [B, T, dim], steps 1-5."""
    c, H, d, mem = layer.config, layer.num_heads, layer.head_dim, layer.memory
    tok = position_factors(mem)
    ys = []
    for s in range(x.shape[0]):
        heads = []
        for h in range(H):
            rows = slice(h * d, (h + 1) * d)
            q, k, v = (x[s] @ p.weight[rows].T for p in (layer.q_proj, layer.k_proj, layer.v_proj))
            if c.qk_l2_norm:
                q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
            scale = c.base_lr if c.rule == "delta" else c.base_lr / d  # the delta rule's beta: no 1/d
            lr = scale * torch.sigmoid(x[s] @ layer.lr_proj.weight[h] + layer.lr_proj.bias[h])
            lr = lr.clamp(c.eta_min, c.eta_max)
            if c.rule == "delta":
                log_decay = None
                if layer.decay_proj is not None:
                    p = layer.decay_proj
                    log_decay = -F.softplus(x[s] @ p.weight[h] + p.bias[h])
                heads.append(_delta_memory_head(mem, h, q, k, v, lr, log_decay))
                continue
            w0 = {n: p[h] for n, p in mem.initial.items()}
            heads.append(reference_head(
                c.inner, w0, mem.ln_weight[h], mem.ln_bias[h], mem.ln_eps, tok, mem.mini_batch_size,
                q, k, v, lr, 0, c.weight_norm_clip, c.inner_residual))
        o = torch.cat(heads, dim=-1)
        o = F.layer_norm(o, (H * d,), layer.post_norm.weight, layer.post_norm.bias, layer.post_norm.eps)
        if layer.out_proj is not None:
            o = o @ layer.out_proj.weight.T
        ys.append(torch.tanh(layer.gate_alpha) * o)
    return torch.stack(ys)
