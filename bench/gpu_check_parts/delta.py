"""Part DELTA: the delta-rule engine, flash-linear-attention's kernels against the torch engine:
equal within bf16 tolerance, then their speed."""

from __future__ import annotations

import math
import time

import torch

from .common import (
    DELTA,
    Events,
    Job,
    Row,
    Settings,
    error,
    fmt_gib,
    free_memory,
    is_oom,
    peak_gib,
    reset_peak,
    sync,
)


def _delta_inputs(s: Settings, T: int, seed: int = 0, decay: bool = False):
    """One memory's streams at the check's head shape, keys and queries with their bias row (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, d = s.ttt_heads, s.ttt_head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(s.device)

    one = torch.ones(1, H, T, 1, device=s.device)
    q = torch.cat([torch.nn.functional.normalize(rand(1, H, T, d), dim=-1), one], -1)
    k = torch.cat([torch.nn.functional.normalize(rand(1, H, T, d), dim=-1), one], -1)
    v, beta, state = rand(1, H, T, d), torch.sigmoid(rand(1, H, T)), 0.1 * rand(1, H, d + 1, d)
    log_decay = -torch.nn.functional.softplus(rand(1, H, T) - 6.0) if decay else None
    return q, k, v, beta, state, log_decay


def _delta_fwd_bwd(engine, inputs, seed: int = 1):
    """Reads, final state and the gradient of every input of a fixed random projection of both."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out, state = engine(*inputs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out.device)
    w_state = torch.randn(state.shape, generator=g).to(out.device)
    grads = torch.autograd.grad((out.float() * w_out).sum() + (state.float() * w_state).sum(),
                                [t for t in inputs if t is not None])
    return [out.detach(), state.detach(), *grads]


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def part_delta(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    for case in cases:
        events.write(event="start", case=case["id"])
        try:
            _delta_case(s, case, events)
        except Exception as exn:  # noqa: BLE001
            events.row(Row(DELTA, case["id"], "OOM" if is_oom(exn) else "FAIL", note=error(exn)))
        free_memory()
        events.write(event="done", case=case["id"])


def _delta_case(s: Settings, case: dict, events: Events) -> None:
    """One case of part DELTA: its row (SKIP, with the reason, where fla cannot run)."""
    from functools import partial

    from moshi_ttt.ttt import fla_kernels
    from moshi_ttt.ttt.delta import chunk_delta_rule

    names = ("reads", "state", "dq", "dk", "dv", "dbeta", "dS0", "dlog_decay")
    tol = 3e-2  # bf16 inputs (fla) against fp32 throughout (torch): relative Frobenius error
    decay = case.get("decay", False)
    reason = fla_kernels.unavailable_reason(torch.device(s.device), torch.float32, s.ttt_head_dim + 1, 0, decay)
    if case["kind"] == "speed" and case["engine"] == "torch":
        reason = None
    if reason is not None:
        events.row(Row(DELTA, case["id"], "SKIP", note=f"fla does not run here: {reason}"))
        return
    if case["kind"] == "equal":
        inputs = _delta_inputs(s, case["T"], decay=decay)
        # torch on the bf16-rounded inputs: what differs is then the kernels, not the rounding
        rounded = [None if t is None else t.to(torch.bfloat16).float() for t in inputs[:4]]
        torch_out = _delta_fwd_bwd(chunk_delta_rule, [*rounded, *inputs[4:]])
        if case.get("stream"):  # fla's recurrent kernel, one frame per call, as LMGen runs it
            def streamed(q, k, v, beta, state, log_decay=None):
                outs = []
                for t in range(q.shape[2]):
                    sl = slice(t, t + 1)
                    o, state = fla_kernels.fla_chunk_delta_rule(
                        q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], state,
                        None if log_decay is None else log_decay[:, :, sl])
                    outs.append(o)
                return torch.cat(outs, 2), state
            with torch.no_grad():
                got = list(streamed(*inputs))
            want = torch_out[:2]
        else:
            got = _delta_fwd_bwd(fla_kernels.fla_chunk_delta_rule, inputs)
            want = torch_out
        errors = {n: _rel_error(a, b) for n, a, b in zip(names, got, want)}
        worst = max(errors, key=errors.get)
        status = "PASS" if errors[worst] <= tol else "FAIL"
        events.row(Row(DELTA, case["id"], status, f"worst rel. error {errors[worst]:.2e} ({worst})",
                       f"<= {tol:g}", "", ", ".join(f"{n} {e:.1e}" for n, e in errors.items()),
                       {"errors": errors}))
        return
    T, engine_name = case["T"], case["engine"]
    # the torch engine as the product runs it: checkpoint groups of 16 chunks
    engine = (partial(chunk_delta_rule, checkpoint_group_size=16) if engine_name == "torch"
              else fla_kernels.fla_chunk_delta_rule)
    inputs = _delta_inputs(s, T)
    _delta_fwd_bwd(engine, inputs)  # warm-up (Triton compiles here)
    sync(s.device)
    reset_peak(s.device)
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        _delta_fwd_bwd(engine, inputs)
        sync(s.device)
        best = min(best, time.perf_counter() - t0)
    data = {"fwd_bwd_s": best, "frames_per_s": T / best, "peak_gib": peak_gib(s.device)}
    events.row(Row(DELTA, case["id"], "PASS", f"{T / best:,.0f} frames/s", "", "",
                   f"{s.ttt_heads}x{s.ttt_head_dim}, fwd+bwd {best:.3g} s, peak {fmt_gib(data['peak_gib'])}",
                   data))


def delta_cases(s: Settings) -> list[dict]:
    T = s.delta_equal_T
    cases = [{"id": f"fla == torch T={T}", "kind": "equal", "T": T},
             {"id": f"fla == torch T={T} decay", "kind": "equal", "T": T, "decay": True},
             {"id": "fla recurrent == torch T=8, one frame a call", "kind": "equal", "T": 8, "stream": True}]
    for T in s.delta_lengths:
        cases += [{"id": f"speed {e} T={T}", "kind": "speed", "engine": e, "T": T} for e in ("torch", "fla")]
    return cases
