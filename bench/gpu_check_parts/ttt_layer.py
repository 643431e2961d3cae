"""Part TTT_LAYER: the TTT layer at Moshi's width, its tokens/s and share of the GPU's bf16 peak
(the layer is built and stepped by bench/ttt_layer.py, the layer bench)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .common import (
    TTT_LAYER,
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
)


def part_ttt_layer(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
    from ttt_layer import build, fwd_bwd  # bench/ttt_layer.py: the layer bench's builder and step

    from moshi_ttt.ttt import TTTConfig, TTTLayer

    peak = s.peak_flops
    flops_per_token: dict[str, float] = {}
    for case in cases:
        events.write(event="start", case=case["id"])
        inner, T = case["inner"], case["T"]
        try:
            torch.manual_seed(0)
            if inner == "delta":  # the product's memory: kernel auto (fla on CUDA when it imports)
                cfg = TTTConfig(rule="delta", num_heads=s.ttt_heads, head_dim=s.ttt_head_dim)
                layer = TTTLayer(cfg, s.ttt_heads * s.ttt_head_dim, name="bench").to(s.device)
                with torch.no_grad():
                    layer.out_proj.weight.normal_(0, 0.02)
            else:
                layer = build(inner, s.ttt_heads, s.ttt_head_dim, s.device, 16)
            dim, b = layer.dim, max(layer.memory.mini_batch_size, 64)
            if inner not in flops_per_token:  # counted on the torch engine: Triton kernels are invisible to it
                kernel = layer.memory.config.kernel
                layer.memory.config.kernel = "torch"
                xf = torch.randn(1, 8 * b, dim, device=s.device, requires_grad=True)
                with FlopCounterMode(display=False) as counter:
                    fwd_bwd(layer, xf, "bf16")
                flops_per_token[inner] = counter.get_total_flops() / (8 * b)
                layer.memory.config.kernel = kernel
            x = torch.randn(1, T, dim, device=s.device, requires_grad=True)
            fwd_bwd(layer, x, "bf16")  # warm-up at this length
            reset_peak(s.device)
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                y = fwd_bwd(layer, x, "bf16")  # synchronises on CUDA
                best = min(best, time.perf_counter() - t0)
            if not torch.isfinite(y).all():
                raise FloatingPointError(f"non-finite TTT output at T={T}")
            tokens_s = T / best
            tflops = flops_per_token[inner] * T / best / 1e12
            share = f"{100 * tflops * 1e12 / peak:.1f} % of peak" if peak else "peak unknown"
            data = {"tokens_per_s": tokens_s, "tflops": tflops, "peak_tflops": peak / 1e12 if peak else None,
                    "flops_per_token": flops_per_token[inner], "fwd_bwd_s": best, "peak_gib": peak_gib(s.device)}
            events.row(Row(TTT_LAYER, case["id"], "PASS", f"{tokens_s:,.0f} tok/s, {tflops:.3g} TFLOP/s",
                           f"bf16 peak {peak / 1e12:.3g} TFLOP/s" if peak else "", share,
                           f"{s.ttt_heads}x{s.ttt_head_dim}, fwd+bwd {best:.3g} s, peak {fmt_gib(data['peak_gib'])}",
                           data))
            del layer, x
        except Exception as exn:  # noqa: BLE001
            events.row(Row(TTT_LAYER, case["id"], "OOM" if is_oom(exn) else "FAIL", note=error(exn)))
        free_memory()
        events.write(event="done", case=case["id"])
