"""The delta rule, computed chunkwise: a write every frame at the cost of matmuls over chunks.

One head's memory is a matrix S [K, V]. Frame t writes, with a_t = 1 unless decay is on,

    S_t = a_t S_{t-1} + k_t u_t^T,    u_t = beta_t (v_t - a_t S_{t-1}^T k_t)

and a query reads q^T S (``moshi_ttt.ttt.reference.reference_delta_head`` writes this token by
token: the definition this file must equal). In a chunk of C frames with the cumulative log-decay
G_i = sum_{m <= i} log a_m, the u's of the chunk solve one unit lower-triangular system
(Yang et al. 2024, the WY/UT representation; Yang et al. 2025 with the decay):

    (I + A) U = diag(beta) V - diag(beta e^G) K S,      A_ij = beta_i e^{G_i - G_j} k_i . k_j   (j < i)

so U = U0 - W S, where U0 and W depend on the chunk's own frames only and are solved for every
chunk at once. One sequential step per chunk remains:

    U = U0 - W S
    O = (Q * e^G) S + (tril(Q K^T) * e^{G_i - G_j}) U
    S <- e^{G_C} S + (K * e^{G_C - G})^T U

Every exponent above is <= 0, so nothing overflows whatever the decay.

A read is ``inclusive`` (query i sees S after frame i: a layer's own causal read) or strict (S
before frame i). A read lag of L frames (a memory of what left an attention window) is a strict
read of the query stream shifted by L - 1 frames (``delta_rule_read``): exact to the frame for
any L and chunk size, with no window that grows with the chunk.

Steps run in checkpoint groups of chunks: the backward keeps a group's input state and frames
and recomputes the rest, so what training keeps is the chunk-boundary states, not the chunks.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from moshi_ttt.ttt.scan import _Checkpoint

Tensor = torch.Tensor


def _chunks(x: Tensor, size: int) -> Tensor:
    """[B, H, N, ...] -> [B, H, n, size, ...], zero-padded at the end (zero beta writes nothing)."""
    back = -x.shape[2] % size
    if back:
        x = F.pad(x, [0, 0] * (x.dim() - 3) + [0, back])
    return x.reshape(*x.shape[:2], -1, size, *x.shape[3:])


def _pairwise_decay(G: Tensor, Gq: Tensor, mask: Tensor) -> Tensor:
    """e^{Gq_i - G_j} where ``mask`` [C, C] holds, 0 elsewhere (masked before exp: never > 1)."""
    diff = Gq[..., :, None] - G[..., None, :]
    return torch.exp(diff.masked_fill(~mask, float("-inf")))


def _group(inclusive: bool, has_decay: bool, S: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
           *log_decay: Tensor) -> tuple[Tensor, Tensor]:
    """Chunks [B, H, n, C, ...] of one checkpoint group from state S [B, H, K, V]: (reads, state)."""
    C, Kd = k.shape[-2], k.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=k.device)
    strict, read_mask = ones.tril(-1), ones.tril(0 if inclusive else -1)
    kk = k @ k.transpose(-1, -2)
    qk = q @ k.transpose(-1, -2)
    bk = beta[..., None] * k
    if has_decay:
        g = log_decay[0]
        G = g.cumsum(-1)  # [B, H, n, C]
        Gq = G if inclusive else G - g  # the decay a read sees: after (or before) its own frame's
        A = beta[..., None] * kk * _pairwise_decay(G, G, strict)
        rhs_k = bk * torch.exp(G)[..., None]
        qk = qk * _pairwise_decay(G, Gq, read_mask)
        q = q * torch.exp(Gq)[..., None]
        last = G[..., -1:]  # [B, H, n, 1]
        k_out = k * torch.exp(last - G)[..., None]
        keep = torch.exp(last)[..., None]  # [B, H, n, 1, 1]
    else:
        A = (beta[..., None] * kk).masked_fill(~strict, 0.0)
        rhs_k, k_out, keep = bk, k, None
        qk = qk.masked_fill(~read_mask, 0.0)
    # (I + A)^-1 once per chunk (a solve against I: cheaper than one against the 2K + 1 right-hand
    # columns, forward and backward), then [W | U0] = (I + A)^-1 [diag(beta e^G) K | diag(beta) V]
    eye = torch.eye(C, dtype=k.dtype, device=k.device).expand_as(A)
    inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # reads A's diagonal as 1
    solved = inverse @ torch.cat([rhs_k, beta[..., None] * v], -1)
    W, U0 = solved[..., :Kd], solved[..., Kd:]
    # O = Q S + QK (U0 - W S) = (Q - QK W) S + QK U0: what does not need S is computed for all chunks at
    # once, and one matmul per chunk reads both S-dependent terms ([Q - QK W; W] S)
    reads0 = qk @ U0
    readers = torch.cat([q - qk @ W, W], -2)
    per_chunk = [t.unbind(2) for t in (readers, reads0, U0, k_out.transpose(-1, -2))]
    keeps = keep.unbind(2) if keep is not None else [None] * len(per_chunk[0])
    reads = []
    # unbind, not x[:, :, c]: a slice's gradient is a full-size zero tensor per chunk (quadratic backward)
    for (rw_c, r0_c, U0_c, kT_c), keep_c in zip(zip(*per_chunk), keeps):
        read_c, WS = (rw_c @ S).split(C, -2)
        reads.append(read_c + r0_c)
        S = (S if keep_c is None else S * keep_c) + kT_c @ (U0_c - WS)
    return torch.stack(reads, 2), S


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    state: Tensor,
    log_decay: Tensor | None = None,
    *,
    chunk_size: int = 64,
    inclusive: bool = True,
    checkpoint_group_size: int = 0,
) -> tuple[Tensor, Tensor]:
    """Write every frame of (k, v) into S and read it with q, one query per frame.

    Args:
        q: [B, H, N, K] queries, query i read with the state after frame i (``inclusive``) or before it.
        k: [B, H, N, K] keys; v: [B, H, N, V] values; beta: [B, H, N] write strengths.
        state: [B, H, K, V] the memory before frame 0.
        log_decay: [B, H, N] log a_t (<= 0), or None for a_t = 1 (the plain delta rule).
        chunk_size: frames per chunk (the result does not depend on it).
        checkpoint_group_size: chunks per gradient-checkpoint group (0: keep every intermediate).

    Returns:
        (reads [B, H, N, V], the state after frame N - 1).
    """
    N = k.shape[2]
    if q.shape[2] != N:
        raise ValueError(f"delta rule: {q.shape[2]} queries for {N} frames (one query per frame)")
    if N == 0:
        return v.new_zeros(*v.shape[:2], 0, v.shape[-1]), state
    # as many chunks as chunk_size asks for, of equal size: 91 frames at 64 are 2 chunks of 46, not 64 + 27
    # padded to 128 (the C^2 terms make padding cost more than the frames it pads)
    chunks = -(-N // max(1, min(chunk_size, N)))
    size = -(-N // chunks)
    streams = [_chunks(t, size) for t in (q, k, v, beta)]
    if log_decay is not None:
        streams.append(_chunks(log_decay, size))
    n = streams[1].shape[2]
    per_group = checkpoint_group_size if checkpoint_group_size > 0 else n
    use_ckpt = checkpoint_group_size > 0 and torch.is_grad_enabled()
    fn = partial(_group, inclusive, log_decay is not None)
    # split once (not a slice per group): its backward concatenates instead of zero-filling per group
    groups = zip(*(t.split(per_group, dim=2) for t in streams))
    reads = []
    for parts in groups:
        out, state = _Checkpoint.apply(fn, state, *parts) if use_ckpt else fn(state, *parts)
        reads.append(out)
    out = torch.cat(reads, 2) if len(reads) > 1 else reads[0]
    return out.flatten(2, 3)[:, :, :N], state


def delta_rule_read(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    state: Tensor,
    log_decay: Tensor | None = None,
    *,
    read_lag: int = 0,
    query_start: int = 0,
    num_commit: int | None = None,
    chunk_size: int = 64,
    checkpoint_group_size: int = 0,
    engine=chunk_delta_rule,
) -> tuple[Tensor, Tensor]:
    """Write the first ``num_commit`` frames of (k, v) and read the queries of frames query_start..N-1.

    ``read_lag=0``: the query of frame t reads S after frame t (all N frames are written).
    ``read_lag=L>=1``: it reads S after frames 0..t-L (the state before frame 0 for t < L - 1);
    the frames a later query still needs unwritten (the last L - 1) are the caller's to keep.
    ``engine``: ``chunk_delta_rule`` or a function with its signature (flash-linear-attention's).
    Returns (reads [B, H, N - query_start, V], state after ``num_commit`` frames).
    """
    N, T = k.shape[2], q.shape[2]
    num_commit = N if num_commit is None else num_commit
    if T != N - query_start:
        raise ValueError(f"delta rule: {T} queries for frames {query_start}..{N - 1}")
    run = partial(engine, chunk_size=chunk_size, checkpoint_group_size=checkpoint_group_size)
    if read_lag == 0:
        if query_start or num_commit != N:
            raise ValueError("delta rule: a read at lag 0 writes every frame and reads every query")
        return run(q, k, v, beta, state, log_decay, inclusive=True)
    # queries of frames < L - 1 read the state before frame 0; the query of frame t >= L - 1 reads S after
    # frame t - L, i.e. the strict read at write position s = t - L + 1: queries shifted by L - 1 frames
    p = min(T, max(0, read_lag - 1 - query_start))
    if T - p != num_commit:
        raise ValueError(f"delta rule: num_commit={num_commit} must be {T - p} for {N} frames at lag {read_lag}")
    head = q[:, :, :p] @ state
    if not num_commit:
        return head, state
    tail, state = run(q[:, :, p:], k[:, :, :num_commit], v[:, :, :num_commit], beta[:, :, :num_commit], state,
                      None if log_decay is None else log_decay[:, :, :num_commit], inclusive=False)
    return torch.cat([head, tail], 2) if p else tail, state
