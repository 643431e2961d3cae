"""Part ATTENTION: FlexAttention against chunked SDPA, equal and then faster?"""

from __future__ import annotations

import math
import time

import torch

from .common import (
    ATTENTION,
    Events,
    Job,
    Row,
    Settings,
    error,
    free_memory,
    is_oom,
    peak_gib,
    reset_peak,
    sync,
)


def attend(q, k, v, window: int, backend: str, compiled: bool, prefix=None, chunk: int | None = None):
    """``local_attention`` with ``backend``. FlexAttention runs compiled on CUDA only (as in
    training: ``flex_available``); the dry run calls the same FlexAttention kernel and block mask
    eagerly on the CPU."""
    from moshi_ttt.models import attention as A

    prefix_k, prefix_v = prefix if prefix is not None else (None, None)
    if backend != "flex" or compiled:
        if backend == "flex" and not A.flex_available(q.device):
            raise RuntimeError("FlexAttention unavailable here (moshi_ttt.models.attention.flex_available: needs "
                               "CUDA, torch.nn.attention.flex_attention and NO_TORCH_COMPILE unset)")
        return A.local_attention(q, k, v, window, chunk_size=chunk, prefix_k=prefix_k, prefix_v=prefix_v,
                                 backend=backend)
    T = q.shape[2]
    effective = min(window, T)
    plan = A._Plan(length=T, window=effective, chunk=chunk or A.default_chunk_size(effective),
                   scale=q.shape[-1] ** -0.5, kernel="sdpa")
    pk, pv, pm = A._canonical_prefix(prefix_k, prefix_v, None, q, plan.num_blocks, chunk is not None)
    return A._flex_local_attention(q, k, v, plan, pk, pv, pm, False, compiled=False)[0]


def _fwd_bwd(q, k, v, grad, window, backend, compiled, prefix=None, chunk=None, backward=True):
    """Forward + backward: (output, input gradients); ``backward=False``: the forward alone, with no
    input asking for a gradient (no gradients)."""
    if not backward:
        with torch.no_grad():
            out = attend(q.detach(), k.detach(), v.detach(), window, backend, compiled,
                         [t.detach() for t in prefix] if prefix else None, chunk)
        return out, []
    for t in (q, k, v, *(prefix or ())):
        t.grad = None
    out = attend(q, k, v, window, backend, compiled, prefix, chunk)
    out.backward(grad)
    grads = [t.grad for t in (q, k, v, *(prefix or ()))]
    return out.detach(), grads


def eager_flex_backward(device: str) -> bool:
    """Whether uncompiled FlexAttention has a backward here: torch 2.9 has one on the CPU, torch
    2.11 refuses (NotImplementedError); compiled on CUDA, it always has."""
    if device.startswith("cuda"):
        return True
    x = torch.randn(1, 1, 16, 8, requires_grad=True)
    try:
        attend(x, x, x, 8, "flex", False).sum().backward()
    except NotImplementedError:
        return False
    return True


def part_attention(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    device, compiled = s.device, not s.dry_run
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    backward = compiled or eager_flex_backward(device)  # else both backends run forward only
    for case in cases:
        events.write(event="start", case=case["id"])
        try:
            if case["kind"] == "equal":
                events.row(_attention_equal(s, case, device, dtype, compiled, backward))
            else:
                events.row(_attention_speed(s, case, device, dtype, compiled, backward))
        except Exception as exn:  # noqa: BLE001
            events.row(Row(ATTENTION, case["id"], "OOM" if is_oom(exn) else "FAIL", note=error(exn)))
        free_memory()
        events.write(event="done", case=case["id"])


NO_EAGER_FLEX_BACKWARD = f"forward only: torch {torch.__version__}'s uncompiled FlexAttention has no backward on the CPU"


def _attention_equal(s: Settings, case: dict, device: str, dtype: torch.dtype, compiled: bool,
                     backward: bool = True) -> Row:
    """flex and sdpa against an fp32 reference: flex must be as close to it as sdpa is."""
    e = s.attn_equal
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, T, D, W = e["B"], e["H"], e["T"], e["D"], e["window"]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    base = [rand(B, H, T, D) for _ in range(3)]
    grad = rand(B, H, T, D)
    chunk = prefix = None
    if case["prefix"]:  # kv_slots' layout: one set of slots per query block
        chunk = max(8, W // 2)
        blocks = math.ceil(T / chunk)
        prefix = [rand(B, H, blocks, 4, D) for _ in range(2)]

    def run(backend, dt, comp):
        q, k, v = (t.to(dt).requires_grad_() for t in base)
        pre = [t.to(dt).requires_grad_() for t in prefix] if prefix else None
        out, grads = _fwd_bwd(q, k, v, grad.to(dt), W, backend, comp, pre, chunk, backward)
        return out.float(), [x.float() for x in grads]

    ref_out, ref_grads = run("math", torch.float32, False)
    errors, outs = {}, {}
    for backend in ("sdpa", "flex"):
        outs[backend], grads = run(backend, dtype, compiled if backend == "flex" else False)
        errors[backend] = max([(outs[backend] - ref_out).abs().max().item()]
                              + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
    errors["flex_vs_sdpa_out"] = (outs["flex"] - outs["sdpa"]).abs().max().item()
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    ok = errors["flex"] <= 2 * errors["sdpa"] + atol
    return Row(ATTENTION, case["id"], "PASS" if ok else "FAIL",
               f"flex err {errors['flex']:.2e} (|flex-sdpa| out {errors['flex_vs_sdpa_out']:.2e})",
               f"sdpa err {errors['sdpa']:.2e}", "",
               f"vs fp32 reference, {'out + grads' if backward else 'out'}, {dtype}, T={T} W={W}"
               + (", eager flex (CPU)" if not compiled else "") + ("" if backward else f"; {NO_EAGER_FLEX_BACKWARD}"),
               errors)


def _attention_speed(s: Settings, case: dict, device: str, dtype: torch.dtype, compiled: bool,
                     backward: bool = True) -> Row:
    a = s.attn_speed
    T, H, D, W = case["T"], a["H"], a["D"], a["window"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(1, H, T, D, generator=g).to(device, dtype)
    res = {}
    for backend in ("sdpa", "flex"):
        comp = compiled if backend == "flex" else False
        t0 = time.perf_counter()
        _fwd_bwd(q, k, v, grad, W, backend, comp, backward=backward)  # warm-up: compilation, block mask, allocator
        sync(device)
        res[f"{backend}_first_s"] = time.perf_counter() - t0
        best = math.inf
        reset_peak(device)
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            _fwd_bwd(q, k, v, grad, W, backend, comp, backward=backward)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        res[f"{backend}_s"] = best
        res[f"{backend}_peak_gib"] = peak_gib(device)
    speedup = res["sdpa_s"] / res["flex_s"]
    note = (f"{'fwd+bwd' if backward else 'fwd'}, {H}x{D} heads, W={W}, first flex call {res['flex_first_s']:.1f} s"
            + (" (compile)" if compiled else " (eager, CPU)") + ("" if backward else f"; {NO_EAGER_FLEX_BACKWARD}"))
    if res["flex_peak_gib"] is not None:
        note += f", peak flex {res['flex_peak_gib']:.2f} / sdpa {res['sdpa_peak_gib']:.2f} GiB"
    return Row(ATTENTION, case["id"], "PASS", f"flex {1e3 * res['flex_s']:.1f} ms", f"sdpa {1e3 * res['sdpa_s']:.1f} ms",
               f"flex {speedup:.2f}x faster" if speedup >= 1 else f"flex {1 / speedup:.2f}x slower", note, res)
