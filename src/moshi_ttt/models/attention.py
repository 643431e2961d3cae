"""Linear-cost causal sliding-window attention for Moshi's temporal transformer.

Moshi's training forward builds a dense ``[T, T]`` mask (``0 <= t - s < context``), so time and
memory grow as T^2 although every query only sees ``context`` keys. ``local_attention`` computes
exactly that window in O(T x W): queries go in blocks of ``chunk_size`` and each block attends to
the keys ``[start - W + 1, end)`` through SDPA with a small mask. A custom autograd function
runs the backward block by block too (from the saved log-sum-exp with the fused CPU kernel,
otherwise by recomputing the block) and accumulates the key/value gradients in place, so nothing
quadratic is ever stored (plain autograd over slices would allocate a full-size gradient per block).
``install_local_attention`` turns the temporal transformer's attention modules into
``LocalStreamingAttention`` in place: same parameters, same state_dict keys, moshi's own
projections and RoPE; streaming (LMGen) still runs moshi's ring-KV-cache forward.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.modules.transformer import (
    StreamingMultiheadAttention,
    apply_weights_per_step,
    expand_repeated_kv,
)
from torch import nn

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "math", "flex")
WindowSpec = int | None | Mapping[int, int | None]


def default_chunk_size(window: int) -> int:
    """Query block size: large enough to amortise per-block overhead, small next to the window
    so that the masked-out triangle (about chunk/window of the work) stays cheap."""
    return int(min(256, max(64, 2 ** round(math.log2(max(window, 1) / 16)))))


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass(frozen=True)
class _Plan:
    """Static description of one call: which keys each query block reads, and with which kernel.

    kernel: ``sdpa`` (public SDPA; the backward recomputes each block), ``cpu_flash`` (the fused
    CPU flash kernel that SDPA itself dispatches to, called directly so that its log-sum-exp is
    kept and the backward needs no recomputation) or ``math`` (explicit softmax, returns lse)."""

    length: int
    window: int
    chunk: int
    scale: float
    kernel: str

    @property
    def explicit_softmax(self) -> bool:
        return self.kernel == "math"

    @property
    def num_blocks(self) -> int:
        return -(-self.length // self.chunk)

    def blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """(block index, first query, end query, first key) for every query block."""
        for n, start in enumerate(range(0, self.length, self.chunk)):
            end = min(start + self.chunk, self.length)
            yield n, start, end, max(0, start - self.window + 1)

    def base_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Mask of a full interior block: row i (query start+i) sees column j (key start-W+1+j)
        iff i <= j <= i + W - 1; every other block's mask is a view of it. Boolean, or additive
        (0 / -inf in the query dtype) for the fused CPU kernel."""
        rows = torch.arange(self.chunk, device=device).view(-1, 1)
        cols = torch.arange(self.chunk + self.window - 1, device=device).view(1, -1)
        visible = (cols >= rows) & (cols <= rows + self.window - 1)
        return _additive(visible, dtype) if self.kernel == "cpu_flash" else visible

    def block_mask(self, base: torch.Tensor, start: int, end: int, key_start: int) -> torch.Tensor:
        skip = key_start - (start - self.window + 1)
        return base[: end - start, skip: skip + end - key_start]


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def _with_prefix_mask(
    mask: torch.Tensor, prefix_mask: torch.Tensor | None, n: int, slots: int
) -> torch.Tensor:
    """Mask over [prefix slots | local keys] for block ``n``; prefix slots have no position."""
    rows, keys = mask.shape
    if prefix_mask is None:
        visible = mask.new_zeros(rows, slots) if mask.is_floating_point() else mask.new_ones(rows, slots)
        return torch.cat([visible, mask], dim=-1)
    block = prefix_mask[:, :, min(n, prefix_mask.shape[2] - 1)]  # [b, h, M]
    if mask.is_floating_point():
        block = _additive(block, mask.dtype)
    b, h, _ = block.shape
    return torch.cat([block[:, :, None, :].expand(b, h, rows, slots), mask.expand(b, h, rows, keys)], dim=-1)


def _attend_block(
    plan: _Plan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_mask: torch.Tensor | None,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query block against its keys (and prefix slots, in the same softmax): (out, lse)."""
    k, v, mask = _block_keys(k, v, mask, prefix_k, prefix_v, prefix_mask, n)
    if plan.kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=plan.scale), None
    if plan.kernel == "cpu_flash":
        return _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=plan.scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * plan.scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v.to(compute)).to(v.dtype), lse


def _block_keys(k, v, mask, prefix_k, prefix_v, prefix_mask, n):
    """Keys, values and mask of one block with its prefix slots laid out first."""
    if prefix_k is None:
        return k, v, mask
    mask = _with_prefix_mask(mask, prefix_mask, n, prefix_k.shape[2])
    return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2), mask


def _block_prefix(prefix: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if prefix is None:
        return None
    return prefix[:, :, min(n, prefix.shape[2] - 1)]


class _ChunkedLocalAttention(torch.autograd.Function):
    """Blockwise forward; blockwise backward that accumulates dK/dV in place (never a full-size
    gradient per block, as autograd over slices would allocate)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_mask, plan: _Plan):
        B, H, T, _ = q.shape
        out = v.new_empty(B, H, T, v.shape[-1])
        keep_lse = plan.kernel != "sdpa"
        lse = q.new_empty((B, H, T) if keep_lse else (0,), dtype=torch.promote_types(q.dtype, torch.float32))
        base = plan.base_mask(q.device, q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            for n, start, end, key_start in plan.blocks():
                o, block_lse = _attend_block(
                    plan, q[:, :, start:end], k[:, :, key_start:end], v[:, :, key_start:end],
                    plan.block_mask(base, start, end, key_start),
                    _block_prefix(prefix_k, n), _block_prefix(prefix_v, n), prefix_mask, n,
                )
                out[:, :, start:end] = o
                if keep_lse:
                    lse[:, :, start:end] = block_lse
        ctx.plan = plan
        if plan.kernel == "cpu_flash":
            ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_mask, out, lse)
        else:
            ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_mask)
        if not plan.explicit_softmax:
            lse = lse.new_empty(0)
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, prefix_k, prefix_v, prefix_mask, *fused = ctx.saved_tensors
        plan: _Plan = ctx.plan
        acc = torch.promote_types(k.dtype, torch.float32)
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        dpk = None if prefix_k is None else torch.zeros(prefix_k.shape, dtype=acc, device=k.device)
        dpv = None if prefix_v is None else torch.zeros(prefix_v.shape, dtype=acc, device=v.device)
        base = plan.base_mask(q.device, q.dtype)
        for n, start, end, key_start in plan.blocks():
            block = (q[:, :, start:end], k[:, :, key_start:end], v[:, :, key_start:end],
                     plan.block_mask(base, start, end, key_start))
            pk, pv = _block_prefix(prefix_k, n), _block_prefix(prefix_v, n)
            if fused:
                g = _fused_block_backward(plan, grad_out[:, :, start:end], block, pk, pv, prefix_mask, n,
                                          fused[0][:, :, start:end], fused[1][:, :, start:end])
            else:
                lse_grad = grad_lse[:, :, start:end] if plan.explicit_softmax else None
                g = _recomputed_block_backward(plan, grad_out[:, :, start:end], lse_grad, block, pk, pv,
                                               prefix_mask, n)
            dq[:, :, start:end] = g[0]
            dk[:, :, key_start:end] += g[1]
            dv[:, :, key_start:end] += g[2]
            if dpk is not None:
                slot = min(n, prefix_k.shape[2] - 1)
                dpk[:, :, slot] += g[3]
                dpv[:, :, slot] += g[4]
        if dpk is not None:
            dpk, dpv = dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dpk, dpv, None, None


def _recomputed_block_backward(plan, grad_out, grad_lse, block, pk, pv, prefix_mask, n):
    """Gradients of one block by re-running it under autograd (public kernels only)."""
    q, k, v, mask = block
    with torch.enable_grad(), torch.autocast(q.device.type, enabled=False):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if pk is not None:
            pk, pv = pk.detach().requires_grad_(), pv.detach().requires_grad_()
            leaves += [pk, pv]
        o, lse = _attend_block(plan, *leaves[:3], mask, pk, pv, prefix_mask, n)
        outputs, grads = [o], [grad_out]
        if grad_lse is not None:
            outputs.append(lse)
            grads.append(grad_lse)
        return torch.autograd.grad(outputs, leaves, grads)


def _fused_block_backward(plan, grad_out, block, pk, pv, prefix_mask, n, out, lse):
    """Gradients of one block from the saved output and log-sum-exp (no recomputation)."""
    q, k, v, mask = block
    k, v, mask = _block_keys(k, v, mask, pk, pv, prefix_mask, n)
    dq, dk, dv = _CPU_FLASH_BACKWARD(grad_out.contiguous(), q, k, v, out, lse, 0.0, False,
                                     attn_mask=mask, scale=plan.scale)
    if pk is None:
        return dq, dk, dv
    m = pk.shape[2]
    return dq, dk[:, :, m:], dv[:, :, m:], dk[:, :, :m], dv[:, :, :m]


def _canonical_prefix(
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_mask: torch.Tensor | None,
    q: torch.Tensor,
    num_blocks: int,
    chunk_given: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Prefix K/V as [B, H, N, M, D] and its mask as [b, h, N, M] with N in {1, num_blocks}."""
    if prefix_k is None and prefix_v is None:
        if prefix_mask is not None:
            raise ValueError("local_attention: prefix_mask given without prefix_k/prefix_v")
        return None, None, None
    if prefix_k is None or prefix_v is None:
        raise ValueError("local_attention: prefix_k and prefix_v must be given together")
    if prefix_k.shape != prefix_v.shape[:-1] + prefix_k.shape[-1:] or prefix_k.dim() != prefix_v.dim():
        raise ValueError(f"local_attention: prefix_k {tuple(prefix_k.shape)} and prefix_v "
                         f"{tuple(prefix_v.shape)} disagree")
    if prefix_k.dim() == 4:
        prefix_k, prefix_v = prefix_k[:, :, None], prefix_v[:, :, None]
    elif prefix_k.dim() != 5:
        raise ValueError(f"local_attention: prefix_k must be [B, H, M, D] or [B, H, N, M, D], "
                         f"got {tuple(prefix_k.shape)}")
    B, H = q.shape[:2]
    if prefix_k.shape[:2] != (B, H) or prefix_k.shape[-1] != q.shape[-1]:
        raise ValueError(f"local_attention: prefix_k {tuple(prefix_k.shape)} does not match "
                         f"q {tuple(q.shape)}")
    n = prefix_k.shape[2]
    if n > 1 and not chunk_given:
        raise ValueError("local_attention: a per-block prefix needs an explicit chunk_size "
                         "(its block length)")
    if n not in (1, num_blocks):
        raise ValueError(f"local_attention: per-block prefix has {n} blocks, the query needs {num_blocks}")
    if prefix_mask is not None:
        if prefix_mask.dtype != torch.bool:
            raise ValueError("local_attention: prefix_mask must be a bool tensor")
        m = prefix_k.shape[3]
        while prefix_mask.dim() < 4:
            prefix_mask = prefix_mask[None]
        if prefix_mask.dim() != 4 or prefix_mask.shape[-1] != m or prefix_mask.shape[2] not in (1, n) \
                or prefix_mask.shape[0] not in (1, B) or prefix_mask.shape[1] not in (1, H):
            raise ValueError(f"local_attention: prefix_mask {tuple(prefix_mask.shape)} must broadcast to "
                             f"[{B}, {H}, {n}, {m}]")
    return prefix_k, prefix_v, prefix_mask


_COMPILED_FLEX = None
_BLOCK_MASKS: dict[tuple, object] = {}  # FlexAttention block masks by shape, a few kept
_MAX_BLOCK_MASKS = 8


def flex_unavailable_reason(device: torch.device) -> str | None:
    """Why ``attention_backend=flex`` runs chunked SDPA here (None: FlexAttention runs): it is only worth
    it compiled, on CUDA."""
    if device.type != "cuda":
        return f"FlexAttention needs CUDA (device {device})"
    if os.environ.get("NO_TORCH_COMPILE"):
        return "NO_TORCH_COMPILE is set and FlexAttention is only worth it compiled"
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    return None


def flex_available(device: torch.device) -> bool:
    return flex_unavailable_reason(device) is None


_LOGGED_BACKENDS: set[str] = set()


def _log_backend_once(message: str) -> None:
    """The backend a run actually uses, said once (every layer and step asks again)."""
    if message not in _LOGGED_BACKENDS:
        _LOGGED_BACKENDS.add(message)
        logger.info(message)


def _flex_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: _Plan,
    prefix_k: torch.Tensor | None,
    prefix_v: torch.Tensor | None,
    prefix_mask: torch.Tensor | None,
    return_lse: bool,
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same semantics through FlexAttention: prefix slots are laid out before the keys and a
    block-sparse mask keeps both the window and the per-block prefix assignment."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    B, H, T, D = q.shape
    window, chunk = plan.window, plan.chunk
    n_prefix = slots = 0
    flat_mask = None
    if prefix_k is not None:
        n_prefix, slots = prefix_k.shape[2], prefix_k.shape[3]
        k = torch.cat([prefix_k.flatten(2, 3), k], dim=2)
        v = torch.cat([prefix_v.flatten(2, 3), v], dim=2)
        if prefix_mask is not None:
            flat_mask = prefix_mask.expand(B, H, n_prefix, slots).reshape(B, H, n_prefix * slots)
    total = n_prefix * slots

    def mask_mod(b, h, q_idx, kv_idx):
        delta = q_idx - (kv_idx - total)
        visible = (kv_idx >= total) & (delta >= 0) & (delta < window)
        if total:
            in_prefix = kv_idx < total
            if n_prefix > 1:
                in_prefix = in_prefix & (kv_idx // slots == q_idx // chunk)
            if flat_mask is not None:
                in_prefix = in_prefix & flat_mask[b, h, kv_idx.clamp(max=total - 1)]
            visible = visible | in_prefix
        return visible

    key = (T, window, chunk, n_prefix, slots, str(q.device))
    block_mask = _BLOCK_MASKS.get(key) if flat_mask is None else None
    if block_mask is None:
        size = (B, H) if flat_mask is not None else (None, None)
        block_mask = create_block_mask(mask_mod, *size, T, total + T, device=q.device, _compile=compiled)
        if flat_mask is None:
            if len(_BLOCK_MASKS) >= _MAX_BLOCK_MASKS:
                _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
            _BLOCK_MASKS[key] = block_mask
    fn = flex_attention
    if compiled:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    if return_lse:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=plan.scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, block_mask=block_mask, scale=plan.scale), None


def _kernel(q: torch.Tensor, explicit_softmax: bool) -> str:
    if explicit_softmax:
        return "math"
    if q.device.type == "cpu" and _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None:
        return "cpu_flash"
    return "sdpa"


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    chunk_size: int | None = None,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "sdpa",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal sliding-window attention: query t sees keys s with ``0 <= t - s < window``.

    q, k, v: ``[B, H, T, D]``, already RoPE-rotated (positions 0..T-1). ``window=None`` means
    unbounded causal attention. Cost is O(T x (window + chunk_size)) time and O(T x D) memory.

    Prefix slots (``prefix_k``/``prefix_v``) are extra keys without position that queries attend
    to in the same softmax as their local keys: ``[B, H, M, D]`` for slots shared by all queries,
    or ``[B, H, N, M, D]`` with one set per query block (query t uses block ``t // chunk_size``,
    so chunk_size must then be given). ``prefix_mask`` (bool, broadcastable to ``[B, H, N, M]``)
    hides slots; every query still sees at least its own key.

    ``return_lse`` also returns the natural-log log-sum-exp of the scaled scores, ``[B, H, T]``
    float32 (float64 for float64 inputs), so partial attentions can be merged exactly.
    ``backend``: ``sdpa`` (chunked SDPA; on CPU its fused flash kernel is called directly so the
    backward reuses the saved log-sum-exp), ``math`` (chunked explicit softmax, used for
    ``return_lse``) or ``flex`` (compiled FlexAttention on CUDA; falls back to chunked SDPA).
    """
    if backend not in BACKENDS:
        raise ValueError(f"local_attention: backend={backend!r} must be one of {BACKENDS}")
    if q.dim() != 4 or k.shape != q.shape[:-1] + k.shape[-1:] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"local_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be [B, H, T, D] with the same B, H, T")
    T = q.shape[2]
    if T == 0:
        out = v.new_empty(*q.shape[:-1], v.shape[-1])
        return (out, q.new_empty(q.shape[:-1], dtype=torch.float32)) if return_lse else out
    if window is not None and window < 1:
        raise ValueError(f"local_attention: window={window} must be >= 1 (or None for unbounded)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"local_attention: chunk_size={chunk_size} must be >= 1")
    effective = T if window is None else min(window, T)
    chunk = chunk_size or default_chunk_size(effective)
    plan = _Plan(
        length=T,
        window=max(effective, 1),
        chunk=chunk,
        scale=scale if scale is not None else q.shape[-1] ** -0.5,
        kernel=_kernel(q, return_lse or backend == "math"),
    )
    prefix_k, prefix_v, prefix_mask = _canonical_prefix(
        prefix_k, prefix_v, prefix_mask, q, plan.num_blocks, chunk_size is not None
    )
    if backend == "flex":
        reason = flex_unavailable_reason(q.device)
        if reason is None:
            _log_backend_once(f"local attention: compiled FlexAttention on {q.device} (ttt.attention_backend=flex)")
            out, lse = _flex_local_attention(q, k, v, plan, prefix_k, prefix_v, prefix_mask, return_lse)
            return (out, lse) if return_lse else out
        _log_backend_once(f"local attention: chunked SDPA instead of ttt.attention_backend=flex: {reason}")
    out, lse = _ChunkedLocalAttention.apply(q, k, v, prefix_k, prefix_v, prefix_mask, plan)
    return (out, lse) if return_lse else out


class LocalStreamingAttention(StreamingMultiheadAttention):
    """moshi's attention module whose training forward uses ``local_attention``.

    Instances are made in place from existing modules (``from_moshi``): the parameters, the
    state_dict keys and moshi's load hook stay untouched. The window is the module's
    ``context``, so moshi's streaming path (ring KV cache of capacity ``context``, used by LMGen)
    and ``moshi.modules.transformer.set_attention_context`` keep working on the same window.
    """

    moshi_context: int | None
    local_chunk_size: int | None
    local_backend: str

    @classmethod
    def from_moshi(
        cls,
        module: StreamingMultiheadAttention,
        window: int | None = None,
        chunk_size: int | None = None,
        backend: str = "sdpa",
    ) -> LocalStreamingAttention:
        """Convert ``module`` in place (no copy, no re-init); ``window=None`` keeps its context.

        Its ``__class__`` is swapped (here, and back in ``to_moshi``) so that moshi's built weights
        stay where they are; ``cls`` may be a subclass (cache_replacement's, one per memory read)."""
        if not isinstance(module, StreamingMultiheadAttention):
            raise TypeError(f"expected a moshi StreamingMultiheadAttention, got {type(module).__name__}")
        if module.cross_attention or not module.causal:
            raise ValueError("local attention applies to causal self-attention only")
        if module._streaming_state is not None:
            raise RuntimeError("cannot change the attention window while the module is streaming")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend={backend!r} must be one of {BACKENDS}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"attention window={window!r} must be a positive int or None")
        if not isinstance(module, LocalStreamingAttention):
            module.moshi_context = module.context
        if not isinstance(module, cls):
            module.__class__ = cls
        module.context = module.moshi_context if window is None else window
        module.local_chunk_size = chunk_size
        module.local_backend = backend
        return module

    def to_moshi(self) -> StreamingMultiheadAttention:
        """Back to a plain moshi module with its original context."""
        if self._streaming_state is not None:
            raise RuntimeError("cannot restore moshi attention while the module is streaming")
        self.context = self.moshi_context
        for name in ("moshi_context", "local_chunk_size", "local_backend"):
            delattr(self, name)
        self.__class__ = StreamingMultiheadAttention
        return self

    @property
    def window(self) -> int | None:
        return self.context

    def project_qkv(
        self, x: torch.Tensor, rope: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, H, T, D]`` from moshi's in-projections and RoPE, positions 0..T-1
        (``rope=False``: before RoPE, the content alone, as a positionless memory needs it)."""
        B, T, _ = x.shape
        projected = apply_weights_per_step(self.in_projs, self.weights_per_step_schedule, x, 0)
        heads_kv = self.num_heads // self.kv_repeat
        dim = self.embed_dim // self.num_heads
        q = projected[..., : self.embed_dim].unflatten(-1, (self.num_heads, dim)).transpose(1, 2)
        kv = projected[..., self.embed_dim:].unflatten(-1, (2, heads_kv, dim)).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        if rope and self.rope is not None:
            q, k = self.rope(q, k, torch.zeros(B, device=x.device, dtype=torch.long), time_before_heads=False)
        if self.kv_repeat > 1:
            k, v = expand_repeated_kv(k, self.kv_repeat), expand_repeated_kv(v, self.kv_repeat)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention proper; variants override this and keep the projections."""
        return local_attention(
            q, k, v, self.window, chunk_size=self.local_chunk_size, backend=self.local_backend
        )

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` -> ``[B, T, C]`` through moshi's out-projections."""
        x = x.transpose(1, 2).flatten(2)
        return apply_weights_per_step(self.out_projs, self.weights_per_step_schedule, x, 0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self._streaming_state is not None:
            return super().forward(query, key, value)
        return self.project_out(self.attend(*self.project_qkv(query)))

    def configure_for_stage(self, ttt_mini_batch_size: int | None = None, window: int | None = None) -> None:
        """A curriculum stage's attention window, for the layers that use the model's window
        (variants with their own short window - hybrid, cache_replacement - keep it)."""
        if window is not None and not getattr(self, "fixed_window", False):
            LocalStreamingAttention.from_moshi(self, window, self.local_chunk_size, self.local_backend)


def _layer_windows(window: WindowSpec, num_layers: int) -> list[int | None]:
    if window is None or isinstance(window, int):
        return [window] * num_layers
    if not isinstance(window, Mapping):
        raise TypeError(f"window must be None, an int or a dict layer -> int, got {type(window).__name__}")
    bad = [i for i in window if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"window: layer indices {bad} out of range for {num_layers} layers")
    return [window.get(i) for i in range(num_layers)]


def install_local_attention(
    lm_model: nn.Module,
    window: WindowSpec = None,
    chunk_size: int | None = None,
    backend: str = "sdpa",
) -> list[LocalStreamingAttention]:
    """Make every temporal-transformer self-attention of ``lm_model`` local, in place.

    ``window``: None keeps each layer's ``context`` (3000 for Moshi), an int sets all layers,
    a dict ``{layer_index: window}`` sets some layers (others keep their context). Calling it
    again re-configures. The depformer is left alone. Returns the converted modules.
    """
    layers = getattr(getattr(lm_model, "transformer", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(lm_model).__name__} has no .transformer.layers (expected moshi's LMModel)")
    windows = _layer_windows(window, len(layers))
    return [
        LocalStreamingAttention.from_moshi(layer.self_attn, w, chunk_size, backend)
        for layer, w in zip(layers, windows)
    ]


def remove_local_attention(lm_model: nn.Module) -> int:
    """Undo ``install_local_attention``; returns how many modules were restored."""
    restored = [m.to_moshi() for m in list(lm_model.modules()) if isinstance(m, LocalStreamingAttention)]
    return len(restored)
