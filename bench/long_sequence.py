"""Training-step cost (forward + backward) of a tiny Moshi against sequence length, per model variant.

Why: the product must train on 30-minute conversations (22 500 frames); moshi's own training
forward builds a dense T x T mask. This prints seconds, time per frame and peak memory for each
variant in ``VARIANTS`` so the linear-cost claims can be checked. Each measurement runs in a fresh
subprocess so that peak memory is clean and an out-of-memory kill costs one row, not the table.

Add a variant by appending ``Variant(name, builder)`` to ``VARIANTS``; ``builder(lm_kwargs,
device, dtype)`` returns an LMModel ready for a training step (base frozen, grads reaching the
attention). Printed tables only, never timed assertions. On CPU the ratios use process CPU
seconds (``--clock``), which a shared machine disturbs far less than wall time.

    python bench/long_sequence.py --quick
    python bench/long_sequence.py --device cuda --dtype bfloat16 --lengths 3750 22500
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.loaders import _lm_kwargs, get_moshi_lm  # noqa: E402

from moshi_ttt.models.attention import install_local_attention  # noqa: E402
from moshi_ttt.models.insert import install_ttt  # noqa: E402
from moshi_ttt.training.cpu_runtime import keep_freed_memory  # noqa: E402
from moshi_ttt.training.loss import LossConfig, moshi_loss  # noqa: E402

LENGTHS = (188, 750, 3750, 7500, 22500)
QUICK_LENGTHS = (188, 750, 1500)
REFERENCE_LENGTH = 3750

TINY_LM_KWARGS = {
    **_lm_kwargs,
    "dim": 128,
    "num_heads": 4,
    "num_layers": 4,
    "text_card": 64,
    "card": 64,
    "context": 3000,
    "depformer_dim": 64,
    "depformer_dim_feedforward": 256,
    "depformer_num_heads": 4,
    "depformer_num_layers": 2,
}


def frozen_with_input_grad(lm: torch.nn.Module) -> torch.nn.Module:
    """Freeze every base weight but make the transformer input require grad, so that backward
    runs through every attention layer as it does when adapters train inside the stack."""
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.transformer.register_forward_pre_hook(
        lambda _module, args, kwargs: ((args[0].detach().requires_grad_(), *args[1:]), kwargs),
        with_kwargs=True,
    )
    return lm.train()


def build_vanilla(lm_kwargs: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return frozen_with_input_grad(get_moshi_lm(None, lm_kwargs=lm_kwargs, device=device, dtype=dtype))


def build_local(window: int) -> Callable[[dict, str, torch.dtype], torch.nn.Module]:
    def build(lm_kwargs: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
        lm = build_vanilla(lm_kwargs, device, dtype)
        install_local_attention(lm, window=window)
        return lm

    return build


def build_ttt(variant: str, **ttt) -> Callable[[dict, str, torch.dtype], torch.nn.Module]:
    """The product's TTT variant (last layer, moshi_ttt.models.install_ttt) on linear-cost attention;
    its TTT parameters train, as in a real run."""
    def build(lm_kwargs: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
        lm = build_vanilla(lm_kwargs, device, dtype)
        install_ttt(lm, {"variant": variant, "layer_indices": [-1], "attention_window": 3000, **ttt})
        return lm.train()

    return build


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[dict, str, torch.dtype], torch.nn.Module]
    max_frames: int | None = None  # longer sequences are skipped (would not fit / take minutes)


VARIANTS: list[Variant] = [
    Variant("vanilla moshi (dense mask)", build_vanilla, max_frames=7500),
    Variant("local W=3000 (ttt=none)", build_local(3000)),
    Variant("local W=256", build_local(256)),
    Variant("ttt=pre_attention", build_ttt("pre_attention")),
    Variant("ttt=post_attention", build_ttt("post_attention")),
    Variant("ttt=hybrid W=256", build_ttt("hybrid", window=256)),
    Variant("ttt=cache_replacement W=256 (all layers)",
            build_ttt("cache_replacement", window=256, layers=[0, 1, 2, 3])),
    Variant("ttt=cache_replacement kv_slots W=256 (all layers)",
            build_ttt("cache_replacement", window=256, layers=[0, 1, 2, 3], memory_read="kv_slots")),
]
BASELINE = VARIANTS[0].name


def random_codes(lm: torch.nn.Module, frames: int, device: str, seed: int = 0) -> torch.Tensor:
    """[1, 17, T] int64 codes in range: text < text_card, audio < card."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm.text_card, (1, 1, frames), generator=g)
    audio = torch.randint(0, lm.card, (1, lm.num_codebooks - 1, frames), generator=g)
    return torch.cat([text, audio], 1).to(device)


def training_step(lm: torch.nn.Module, codes: torch.Tensor) -> float:
    out = lm(codes)
    pads = (lm.text_padding_token_id, lm.end_of_text_padding_id)
    loss = moshi_loss(out, codes, LossConfig(), pads, lm.audio_offset).loss
    loss.backward()
    return float(loss.detach())


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


def measure(variant: Variant, frames: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Best-of-``repeats`` step time and peak memory of one training step at ``frames``."""
    lm = variant.build(TINY_LM_KWARGS, device, dtype)
    training_step(lm, random_codes(lm, 32, device))  # warm-up: kernels, allocator
    lm.zero_grad(set_to_none=True)
    codes = random_codes(lm, frames, device)
    wall, cpu, peak = [], [], 0
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, start_cpu = time.perf_counter(), time.process_time()
            training_step(lm, codes)
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRSS() as rss:
                start, start_cpu = time.perf_counter(), time.process_time()
                training_step(lm, codes)
            peak = max(peak, rss.delta)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        lm.zero_grad(set_to_none=True)
    return {"wall": min(wall), "cpu": min(cpu), "peak_bytes": peak}


def run_in_subprocess(variant: Variant, frames: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant.name, "--lengths", str(frames),
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
           "--allocator", args.allocator]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": tail[:80]}
    return json.loads(lines[-1])


def quadratic_fit(points: dict[int, float]) -> tuple[float, float] | None:
    """(a, b) of a*T + b*T^2 through the two longest measurements."""
    if len(points) < 2:
        return None
    (t1, y1), (t2, y2) = sorted(points.items())[-2:]
    b = (y2 / t2 - y1 / t1) / (t2 - t1)
    return y1 / t1 - b * t1, b


def quadratic_estimate(points: dict[int, float], frames: int) -> float | None:
    """Extrapolate a dense-attention time with a*T + b*T^2 through the two longest measurements."""
    fit = quadratic_fit(points)
    return None if fit is None else fit[0] * frames + fit[1] * frames * frames


def print_table(results: dict[tuple[str, int], dict], variants: list[Variant], lengths: list[int],
                clock: str) -> None:
    """One row per (variant, T); ms/frame, speed-up and frame-cost ratio use ``clock``."""
    base = {T: r[clock] for (name, T), r in results.items() if name == BASELINE and clock in r}
    header = (f"{'variant':28} {'T':>6} {'wall s':>8} {'cpu s':>8} {'ms/frame':>9} {'peak MB':>8} "
              f"{'vs vanilla':>15} {'frame cost / T=' + str(REFERENCE_LENGTH):>20}")
    print(header)
    print("-" * len(header))
    for variant in variants:
        ref = results.get((variant.name, REFERENCE_LENGTH), {}).get(clock)
        for T in lengths:
            r = results.get((variant.name, T), {})
            if clock not in r:
                print(f"{variant.name:28} {T:>6} {r.get('error', 'skipped'):>8}")
                continue
            speed = ""
            if variant.name != BASELINE:
                if T in base:
                    speed = f"{base[T] / r[clock]:.2f}x"
                elif (est := quadratic_estimate(base, T)) is not None:
                    speed = f"~{est / r[clock]:.1f}x (est.)"
            ratio = f"{(r[clock] / T) / (ref / REFERENCE_LENGTH):.2f}x" if ref else ""
            print(f"{variant.name:28} {T:>6} {r['wall']:>8.2f} {r['cpu']:>8.2f} {1000 * r[clock] / T:>9.3f} "
                  f"{r['peak_bytes'] / 2**20:>8.0f} {speed:>15} {ratio:>20}")
    print(f"ms/frame, speed-ups and frame-cost ratios use {clock} time"
          + (" (process CPU seconds: robust on a shared machine)" if clock == "cpu" else ""))
    if base and max(base) < max(lengths) and (est := quadratic_estimate(base, max(lengths))) is not None:
        print(f"(est.) vanilla at T={max(lengths)}: ~{est:.1f} s {clock}, extrapolated as a*T + b*T^2 "
              "through its two longest measurements")
        linear = quadratic_fit(base)[0] * max(lengths)
        print(f"       of which the linear part a*T (everything but the T^2 attention) is ~{linear:.1f} s: a "
              f"variant that keeps it cannot beat vanilla by more than ~{est / linear:.1f}x at T={max(lengths)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, one repeat")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=2, help="steps per measurement (best time kept)")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads per measurement")
    parser.add_argument("--variants", nargs="+", default=None, help="substrings of variant names to run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="time used for ratios (default: cpu on CPU, wall on CUDA)")
    parser.add_argument("--allocator", choices=["keep", "glibc"], default="keep",
                        help="keep: the training run's host-allocator settings (moshi_ttt.training.cpu_runtime); "
                             "glibc: the defaults (large blocks mmapped and page-faulted at every use)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    dtype = getattr(torch, args.dtype)

    if args.worker is not None:
        variant = next(v for v in VARIANTS if v.name == args.worker)
        torch.set_flush_denormal(True)
        if args.allocator == "keep":
            keep_freed_memory()
        print(json.dumps(measure(variant, lengths[0], args.device, dtype, args.repeats)))
        return

    variants = [v for v in VARIANTS if not args.variants or any(s in v.name for s in args.variants)]
    print(f"tiny Moshi dim={TINY_LM_KWARGS['dim']} layers={TINY_LM_KWARGS['num_layers']} "
          f"device={args.device} dtype={args.dtype} threads={args.threads or torch.get_num_threads()} "
          f"batch=1, forward+backward, base frozen, allocator={args.allocator}")
    results: dict[tuple[str, int], dict] = {}
    for variant in variants:
        for T in lengths:
            if variant.max_frames is not None and T > variant.max_frames:
                results[(variant.name, T)] = {"error": "skipped"}
                continue
            results[(variant.name, T)] = run_in_subprocess(variant, T, args)
            print(f"  {variant.name} T={T}: {results[(variant.name, T)]}", file=sys.stderr, flush=True)
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    print_table(results, variants, lengths, clock)


if __name__ == "__main__":
    main()
