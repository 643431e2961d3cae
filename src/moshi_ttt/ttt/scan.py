"""The scan over mini-batches: write the memory with one stream, read it with another.

One step per mini-batch of b tokens; the only sequential dependency is the fast weights, so
time and memory are linear in T. Steps are run in checkpoint groups: a group keeps only its
input weights and token blocks for the backward pass and recomputes its inner activations,
so activation memory grows with the number of groups, not with the number of steps.

Read lag (in mini-batches) decides which weights a query sees:
- ``read_lag=0``: the standard causal TTT read. Query i of mini-batch j reads with the weights
  W0 - sum_{j'<=i} eta_ij' grad_j'(W0) of its own mini-batch (dual form), W0 = after j-1.
- ``read_lag=L>=1``: queries of mini-batch j read f(q; W) with the weights after mini-batch
  j-L was written (the initial weights when j < L). The write stream never meets its own
  queries, which is what a memory of the keys/values evicted from a local window needs.
Only complete mini-batches are written; a trailing partial one is read (lag 0) but never committed.

The same computation written token by token, without the dual form, is ``moshi_ttt.ttt.reference``
(one page, the definition to read first); the tests hold this scan to it at 1e-8 in float64.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moshi_ttt.ttt.inner import InnerModel, Weights, layer_norm

Tensor = torch.Tensor


def clip_weights(w: Weights, max_norm: float | None) -> Weights:
    """Scale each fast-weight tensor down to Frobenius norm <= max_norm, per sample and head."""
    if max_norm is None:
        return w
    out = {}
    for k, t in w.items():
        norm = torch.linalg.vector_norm(t.flatten(2), dim=-1)
        scale = (max_norm / norm.clamp_min(max_norm)).view(*norm.shape, *([1] * (t.dim() - 2)))
        out[k] = t * scale
    return out


def writes_needed(num_blocks: int, read_lag: int) -> int:
    """Mini-batches that must be written before the last block can be read."""
    return max(0, num_blocks - 1 if read_lag == 0 else num_blocks - read_lag)


def _blocks(x: Tensor, b: int, front: int = 0) -> Tensor:
    """[B, H, N, ...] -> [n, B, H, b, ...]: zero-pad ``front`` tokens before and up to a multiple of b."""
    n_tok = front + x.shape[2]
    back = -n_tok % b
    if front or back:
        x = F.pad(x, [0, 0] * (x.dim() - 3) + [front, back])
    B, H = x.shape[:2]
    return x.reshape(B, H, -1, b, *x.shape[3:]).movedim(2, 0).contiguous()


def ttt_scan(
    inner: InnerModel,
    weights: Weights,
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr: Tensor,
    token_eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    mini_batch_size: int,
    read_lag: int = 0,
    query_start: int = 0,
    num_commit: int | None = None,
    weight_clip: float | None = None,
    checkpoint_group_size: int = 0,
    ln_eps: float | None = 1e-6,
    residual: bool = True,
) -> tuple[Tensor, Weights]:
    """Write (xk -> xv) into the fast weights mini-batch by mini-batch and read them with xq.

    Args:
        inner: the inner model g (``LinearInner`` / ``MLPInner``).
        weights: fast weights before position 0, name -> [B, H, ...]; position 0 starts a mini-batch.
        xq: [B, H, N - query_start, d] queries of positions query_start .. N-1.
        xk, xv: [B, H, N, d] the write stream; the inner loss reconstructs xv - xk from xk (``residual``,
            f(x) = x + ...) or xv (f without the residual).
        lr: [B, H, N] per-token learning rate of the write stream.
        token_eta: [b] factor of position i inside a mini-batch (eta_ij = token_eta[i] * lr[j]).
        ln_weight, ln_bias: [H, d] the per-head LayerNorm of f(x) = x + LN(g(x)); ln_eps None: f has none.
        read_lag: see the module docstring.
        query_start: positions before it have no query (a stream resumed with buffered tokens).
        num_commit: complete mini-batches to write into the returned weights (default: all).
        weight_clip: Frobenius-norm bound applied after every write (None: off).
        checkpoint_group_size: mini-batches per gradient-checkpoint group (0: no checkpointing).

    Returns:
        (out [B, H, N - query_start, d] = xq + LN(g(xq; W_read)) (without ``residual``: no xq), weights
        after num_commit writes).
    """
    B, H, N, d = xk.shape
    b = mini_batch_size
    if read_lag < 0:
        raise ValueError(f"read_lag={read_lag} must be >= 0")
    if xq.shape[2] != N - query_start:
        raise ValueError(f"xq has {xq.shape[2]} positions, expected N - query_start = {N - query_start}")
    n = math.ceil(N / b)
    full = N // b
    num_commit = full if num_commit is None else num_commit
    if not writes_needed(n, read_lag) <= num_commit <= full:
        raise ValueError(
            f"num_commit={num_commit} must lie in [{writes_needed(n, read_lag)}, {full}] for {N} tokens, "
            f"mini_batch_size={b}, read_lag={read_lag}"
        )
    if N == 0:
        return xq, weights  # no positions: nothing to read
    names, n_w = inner.names, len(inner.names)
    Q, K, V, LR = _blocks(xq, b, query_start), _blocks(xk, b), _blocks(xv, b), _blocks(lr, b)
    # everything a group reads is passed explicitly, so the checkpoint can return its gradient
    shared = (token_eta.to(K.dtype), ln_weight[None, :, None, :], ln_bias[None, :, None, :])
    zero_block = K.new_zeros(B, H, b, d)

    def unpack(tensors: tuple[Tensor, ...]):
        tok, lnw, lnb = tensors[:3]
        w = dict(zip(names, tensors[3 : 3 + n_w]))
        return tok, (lnw, lnb, ln_eps), w, tensors[3 + n_w :]

    def prepare(tok: Tensor, Kg: Tensor, Vg: Tensor, LRg: Tensor) -> tuple[Tensor, Tensor]:
        return (Vg - Kg if residual else Vg), (tok[-1] * LRg).unsqueeze(-1)

    if read_lag == 0:
        steps = n

        def group(g0: int, *tensors: Tensor) -> tuple[Tensor, ...]:
            tok, ln, w, (Qg, Kg, Vg, LRg) = unpack(tensors)
            target, eta_last = prepare(tok, Kg, Vg, LRg)
            eta = torch.tril(tok[:, None] * LRg[..., None, :])
            attn = eta * (Qg @ Kg.transpose(-1, -2) + 1.0)
            per_step = zip(*(t.unbind(0) for t in (torch.cat([Kg, Qg], dim=-2), target, attn, eta, eta_last)))
            zq = []
            for i, (kq, tg, at, et, el) in enumerate(per_step):
                z, w = inner.dual(w, kq, tg, at, et, el, ln, g0 + i < num_commit)
                if g0 + i < num_commit:
                    w = clip_weights(w, weight_clip)
                zq.append(z)
            return (*(w[k] for k in names), torch.stack(zq))

        step_inputs = (Q, K, V, LR)
        prefix: list[Tensor] = []
    else:
        reads = max(0, n - read_lag + 1)  # step j reads block j + lag - 1 with the weights after j writes
        steps = max(num_commit, reads)
        n_prefix = min(read_lag - 1, n)  # blocks read with the initial weights
        prefix = []
        if n_prefix:
            if query_start < n_prefix * b:
                zp = inner.forward(weights, Q[:n_prefix].movedim(0, 2).reshape(B, H, n_prefix * b, d))
                prefix = list(zp.reshape(B, H, n_prefix, b, d).movedim(2, 0))
            else:
                prefix = [zero_block] * n_prefix
        R = _pad_steps(Q[read_lag - 1 : read_lag - 1 + reads], steps)
        step_inputs = (R, _pad_steps(K[:num_commit], steps), _pad_steps(V[:num_commit], steps))
        step_inputs += (_pad_steps(LR[:num_commit], steps),)

        def group(g0: int, *tensors: Tensor) -> tuple[Tensor, ...]:
            tok, ln, w, (Rg, Kg, Vg, LRg) = unpack(tensors)
            target, eta_last = prepare(tok, Kg, Vg, LRg)
            zq = []
            for i, (r, k, tg, el) in enumerate(zip(*(t.unbind(0) for t in (Rg, Kg, target, eta_last)))):
                j = g0 + i
                if j < reads:
                    read_end = (j + read_lag) * b  # end of block j + lag - 1
                    zq.append(inner.forward(w, r) if read_end > query_start else zero_block)
                if j < num_commit:
                    w = clip_weights(inner.write(w, k, tg, el, ln), weight_clip)
            out = torch.stack(zq) if zq else zero_block.new_zeros(0, *zero_block.shape)
            return (*(w[k] for k in names), out)

    size = checkpoint_group_size if checkpoint_group_size > 0 else steps
    use_ckpt = checkpoint_group_size > 0 and torch.is_grad_enabled()
    flat = tuple(weights[k] for k in names)
    outs = list(prefix)
    # split (not slicing per group): its backward concatenates once instead of zero-filling a
    # full-length gradient for every group, which would make the backward quadratic in T
    split_inputs = [t.split(size, dim=0) for t in step_inputs]
    for gi, g0 in enumerate(range(0, steps, size)):
        chunk = tuple(parts[gi] for parts in split_inputs)
        if use_ckpt:
            res = _Checkpoint.apply(partial(group, g0), *shared, *flat, *chunk)
        else:
            res = group(g0, *shared, *flat, *chunk)
        flat, zq = res[:n_w], res[n_w]
        if read_lag:
            outs.extend(zq.unbind(0))
        else:
            outs.append(zq)
    zq = torch.cat(outs, dim=0) if read_lag == 0 else torch.stack(outs[:n])
    zq = zq.movedim(0, 2).reshape(B, H, n * b, d)[:, :, query_start:N]
    read = layer_norm(zq, (shared[1], shared[2], ln_eps))
    return (xq + read if residual else read), dict(zip(names, flat))


class _Checkpoint(torch.autograd.Function):
    """Run a group without a graph; rebuild it in backward from the saved inputs.

    torch.utils.checkpoint's non-reentrant form keeps Python objects per saved tensor, and the
    garbage collector's passes over them made long sequences cost more per token; this keeps
    only the group's input tensors. First-order only (no double backward through the scan).
    """

    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return fn(*tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        inputs = [
            t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])
        ]
        with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            outs = ctx.fn(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(
            torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
            if pairs and wanted
            else [None] * len(wanted)
        )
        return (None, *(next(found) if t.requires_grad else None for t in inputs))


def _pad_steps(x: Tensor, steps: int) -> Tensor:
    """Zero-pad the step axis (dim 0) to ``steps`` entries."""
    missing = steps - x.shape[0]
    if missing <= 0:
        return x[:steps]
    return torch.cat([x, x.new_zeros(missing, *x.shape[1:])])
