"""flash-linear-attention's delta-rule kernels, behind the plain-torch engine's signature (CUDA).

``fla`` (the ``fla-core`` package, MIT; ``pip install -e ".[gpu]"``) computes the same chunkwise
delta rule as ``moshi_ttt.ttt.delta.chunk_delta_rule`` in Triton. Its chunk kernels take bf16
inputs and keep the state in fp32; its one-frame-at-a-time kernel (``fused_recurrent``, used
for short calls such as LMGen's one frame per step) takes fp32. ``unavailable_reason`` says why
it does not apply to a memory, so ``ttt.ttt_layer.kernel=auto`` can fall back to the torch
engine and log why, once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

Tensor = torch.Tensor
log = logging.getLogger("moshi_ttt.ttt")

#: fla's key-dim limit (our keys carry one more row than the head: the bias).
MAX_KEY_DIM = 256
#: Calls this short run fla's recurrent kernel in fp32 instead of a bf16 chunk.
RECURRENT_MAX_FRAMES = 16
#: Triton versions whose gated-delta-rule backward raises on Hopper without tilelang (stack-notes).
_GATED_BAD_TRITON = ((3, 4), (3, 7, 1))
_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log a kernel choice the first time it is made (every layer and step makes it again)."""
    if message not in _logged:
        _logged.add(message)
        log.info(message)


@functools.cache
def fla_import_error() -> str | None:
    """None when ``fla`` imports, else why not."""
    if importlib.util.find_spec("fla") is None:
        return 'fla is not installed (pip install -e ".[gpu]")'
    try:
        import fla.ops.delta_rule  # noqa: F401
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception as exn:  # a broken install must not stop the torch engine
        return f"fla does not import: {type(exn).__name__}: {exn}"
    return None


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@functools.cache
def _gated_backward_refused(device_index: int) -> bool:
    """fla's gated backward raises on Hopper with Triton >= 3.4 and < 3.7.1 unless tilelang is there."""
    try:
        import triton
    except ImportError:
        return True
    low, high = _GATED_BAD_TRITON
    bad_triton = low <= _version(triton.__version__) < high
    hopper = torch.cuda.get_device_capability(device_index)[0] == 9
    return bad_triton and hopper and importlib.util.find_spec("tilelang") is None


def unavailable_reason(device: torch.device, dtype: torch.dtype, key_dim: int, read_lag: int, decay: bool) -> str | None:
    """Why fla cannot run this memory (None: it can)."""
    if device.type != "cuda":
        return f"fla's kernels need CUDA (device {device})"
    if dtype == torch.float64:
        return "fla's kernels have no float64"
    error = fla_import_error()
    if error:
        return error
    if key_dim > MAX_KEY_DIM:
        return f"head_dim + 1 = {key_dim} > {MAX_KEY_DIM}, fla's key-dim limit"
    if read_lag:
        return f"a read lag ({read_lag} frames: cache_replacement) is a strict, shifted read fla does not compute"
    if decay and _gated_backward_refused(device.index or 0):
        return "fla's gated delta rule backward raises on Hopper with this Triton (>= 3.4, < 3.7.1) without tilelang"
    return None


def fla_chunk_delta_rule(
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
    """``moshi_ttt.ttt.delta.chunk_delta_rule`` on fla's kernels: [B, H, N, .] in, fp32 reads and state out.

    Chunks are fla's own (64 frames); fla keeps only chunk-boundary states for its backward, so
    ``checkpoint_group_size`` has nothing to add. Inclusive reads only (read lag 0)."""
    if not inclusive:
        raise ValueError("fla computes inclusive reads only (read lag 0)")
    from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    N = k.shape[2]
    if N == 0:
        return v.new_zeros(*v.shape[:2], 0, v.shape[-1]), state
    recurrent = N <= RECURRENT_MAX_FRAMES
    dtype = torch.float32 if recurrent else torch.bfloat16
    q_, k_, v_ = (t.transpose(1, 2).to(dtype).contiguous() for t in (q, k, v))  # fla: [B, T, H, D]
    beta_ = beta.transpose(1, 2).to(dtype).contiguous()
    kwargs = dict(scale=1.0, initial_state=state.float().contiguous(), output_final_state=True)
    if log_decay is None:
        fn = fused_recurrent_delta_rule if recurrent else chunk_delta_rule
        out, final = fn(q_, k_, v_, beta_, **kwargs)
    else:
        g = log_decay.transpose(1, 2).float().contiguous()
        if recurrent:
            out, final = fused_recurrent_gated_delta_rule(q_, k_, v_, g=g, beta=beta_, **kwargs)
        else:
            out, final = chunk_gated_delta_rule(q_, k_, v_, g, beta_, **kwargs)
    return out.transpose(1, 2).to(v.dtype), final.to(state.dtype)
