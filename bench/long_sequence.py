"""Training-step cost (forward + backward) of a tiny Moshi against sequence length, per model variant.

Why: the product must train on 30-minute conversations (22 500 frames); moshi's own training
forward builds a dense T x T mask. This prints seconds, time per frame and peak memory for each
variant of ``variants()`` so the linear-cost claims can be checked. Each measurement runs in a fresh
subprocess so that peak memory is clean and an out-of-memory kill costs one row, not the table.

Add a variant by appending ``Variant(name, builder)`` to the list of ``variants()``; ``builder(lm_kwargs,
device, dtype)`` returns an LMModel ready for a training step (base frozen, grads reaching the
attention). Printed tables only, never timed assertions. On CPU the ratios use process CPU
seconds (``--clock``), which a shared machine disturbs far less than wall time. Vanilla beyond its
longest measurement is extrapolated with a + b*T + c*T^2 (a, b, c >= 0) fitted to every
measurement of it. A row that fails prints its error in the table and the exit status is 1.

    python bench/long_sequence.py --quick
    python bench/long_sequence.py --tiny   # every row at toy sizes in one process, in seconds (tests)
    python bench/long_sequence.py --device cuda --dtype bfloat16 --lengths 3750 22500
"""

from __future__ import annotations

import argparse
import itertools
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
MAX_MISS = 0.2  # vanilla's fit must follow each measurement within this share to extrapolate it
VANILLA_MAX = 7500  # vanilla's dense T x T mask: longer takes tens of GB and many minutes on CPU
WINDOW, LONG_WINDOW = 256, 3000  # the TTT layers' attention window and every other layer's
# --tiny: windows a few frames long so that every memory is written and read at toy lengths; vanilla
# stops one length short so that its extrapolation runs too
TINY_LENGTHS, TINY_WINDOW, TINY_LONG_WINDOW, TINY_VANILLA_MAX = (16, 32, 48, 64), 8, 24, 48

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


def build_ttt(variant: str, long_window: int, **ttt) -> Callable[[dict, str, torch.dtype], torch.nn.Module]:
    """The product's TTT variant (the ``ttt`` section's keys, moshi_ttt.config.schema.TTTVariantConfig; last
    layer unless ``layer_indices`` says otherwise) on linear-cost attention; its TTT parameters train, as in
    a real run."""
    def build(lm_kwargs: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
        lm = build_vanilla(lm_kwargs, device, dtype)
        install_ttt(lm, {"variant": variant, "layer_indices": [-1], "attention_window": long_window, **ttt})
        return lm.train()

    return build


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[dict, str, torch.dtype], torch.nn.Module]
    max_frames: int | None = None  # longer sequences are skipped (would not fit / take minutes)


def variants(window: int = WINDOW, long_window: int = LONG_WINDOW, vanilla_max: int = VANILLA_MAX) -> list[Variant]:
    """The rows, the baseline first. ``window``: the TTT layers' and the short local attention's frames;
    ``long_window``: every other layer's."""
    every_layer = list(range(TINY_LM_KWARGS["num_layers"]))
    cache = {"ttt_layer_attention_window": window, "layer_indices": every_layer}
    return [
        Variant("vanilla moshi (dense mask)", build_vanilla, max_frames=vanilla_max),
        Variant(f"local W={long_window} (ttt=none)", build_local(long_window)),
        Variant(f"local W={window}", build_local(window)),
        Variant("ttt=pre_attention", build_ttt("pre_attention", long_window)),
        Variant("ttt=post_attention", build_ttt("post_attention", long_window)),
        Variant(f"ttt=hybrid W={window}", build_ttt("hybrid", long_window, ttt_layer_attention_window=window)),
        Variant(f"ttt=cache_replacement W={window} (all layers)", build_ttt("cache_replacement", long_window, **cache)),
        Variant(f"ttt=cache_replacement kv_slots W={window} (all layers)",
                build_ttt("cache_replacement", long_window, memory_read="kv_slots", **cache)),
    ]



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


def _error(message: str) -> dict:
    return {"error": message.strip().replace("\n", " ")[:100]}


def run_in_subprocess(variant: Variant, frames: int, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process: its peak memory is its own, and a crash or an out-of-memory
    kill costs this row only. A failure is ``{"error": the last line of its stderr}``."""
    cmd = [sys.executable, __file__, "--worker", variant.name, "--lengths", str(frames),
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
           "--allocator", args.allocator, *(["--tiny"] if args.tiny else [])]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return _error(f"timed out after {args.timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return _error((proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
    return json.loads(lines[-1])


def run_row(variant: Variant, frames: int, args: argparse.Namespace) -> dict:
    """The row's measurement, ``{"skipped": why}`` beyond the variant's ``max_frames``, or ``{"error": ...}``:
    in a fresh process, or in this one with ``--tiny`` (peak memory then includes what earlier rows left)."""
    if variant.max_frames is not None and frames > variant.max_frames:
        return {"skipped": f"T > {variant.max_frames}"}
    if not args.tiny:
        return run_in_subprocess(variant, frames, args)
    try:
        return measure(variant, frames, args.device, getattr(torch, args.dtype), args.repeats)
    except Exception as e:  # noqa: BLE001 - one failed row, reported in the table and the exit status
        print(f"{variant.name} T={frames}: {type(e).__name__}: {e}", file=sys.stderr)
        return _error(f"{type(e).__module__}.{type(e).__name__}: {e}")


@dataclass(frozen=True)
class QuadraticFit:
    """time(T) = a + b*T + c*T^2 with a, b, c >= 0, fitted to measurements by least relative error."""

    a: float
    b: float
    c: float
    worst: float  # largest relative miss on the measurements
    worst_at: int  # the length of that measurement

    def __call__(self, frames: int) -> float:
        return self.a + self.b * frames + self.c * frames * frames

    def linear(self, frames: int) -> float:
        """Everything but the T^2 term (the dense attention's)."""
        return self.a + self.b * frames


def quadratic_fit(points: dict[int, float]) -> QuadraticFit | None:
    """Non-negative least squares of (a + b*T + c*T^2 - y) / y over the measurements (T, y); None with fewer
    than three, which cannot pin three coefficients. Exact by enumeration: the optimum is the unconstrained
    least squares on its set of non-zero coefficients, so the best of the 7 subsets whose solution is
    non-negative is it. T is scaled to thousands of frames to keep the columns comparable."""
    if len(points) < 3:
        return None
    T = torch.tensor(sorted(points), dtype=torch.float64)
    y = torch.tensor([points[t] for t in sorted(points)], dtype=torch.float64)
    x = T / 1000
    design = torch.stack([torch.ones_like(x), x, x * x], dim=1) / y[:, None]
    best, best_err = torch.zeros(3, dtype=torch.float64), float("inf")
    for size in (1, 2, 3):
        for cols in itertools.combinations(range(3), size):
            sol = torch.linalg.lstsq(design[:, cols], torch.ones_like(y)[:, None]).solution[:, 0]
            if (sol < 0).any():
                continue
            coef = torch.zeros(3, dtype=torch.float64)
            coef[list(cols)] = sol
            err = float(((design @ coef - 1) ** 2).sum())
            if err < best_err:
                best, best_err = coef, err
    a, b, c = float(best[0]), float(best[1]) / 1000, float(best[2]) / 1e6
    miss = ((a + b * T + c * T * T - y) / y).abs()
    return QuadraticFit(a, b, c, float(miss.max()), int(T[miss.argmax()]))


def estimates(fit: QuadraticFit | None) -> bool:
    """Whether ``fit`` may extrapolate vanilla: it follows every measurement within ``MAX_MISS``."""
    return fit is not None and fit.worst <= MAX_MISS


def print_table(results: dict[tuple[str, int], dict], rows: list[Variant], lengths: list[int], clock: str,
                baseline: str) -> None:
    """One row per (variant, T); ms/frame, speed-up and frame-cost ratio use ``clock``, against ``baseline``."""
    base = {T: r[clock] for (name, T), r in results.items() if name == baseline and clock in r}
    fit = quadratic_fit(base)
    beyond = [T for T in lengths if base and T > max(base)]
    reference = max([T for T in lengths if T <= REFERENCE_LENGTH] or lengths[:1])
    width = max(len(v.name) for v in rows)
    header = (f"{'variant':{width}} {'T':>6} {'wall s':>8} {'cpu s':>8} {'ms/frame':>9} {'peak MB':>8} "
              f"{'vs vanilla':>15} {'frame cost / T=' + str(reference):>20}")
    print(header)
    print("-" * len(header))
    for variant in rows:
        ref = results.get((variant.name, reference), {}).get(clock)
        for T in lengths:
            r = results.get((variant.name, T), {})
            if clock not in r:
                print(f"{variant.name:{width}} {T:>6} " + (f"FAILED: {r['error']}" if "error" in r
                                                          else f"skipped ({r.get('skipped', 'not run')})"))
                continue
            speed = ""
            if variant.name != baseline:
                if T in base:
                    speed = f"{base[T] / r[clock]:.2f}x"
                elif estimates(fit):  # else print_extrapolation says why there is none
                    speed = f"~{fit(T) / r[clock]:.1f}x (est.)"
            ratio = f"{(r[clock] / T) / (ref / reference):.2f}x" if ref else ""
            print(f"{variant.name:{width}} {T:>6} {r['wall']:>8.2f} {r['cpu']:>8.2f} {1000 * r[clock] / T:>9.3f} "
                  f"{r['peak_bytes'] / 2**20:>8.0f} {speed:>15} {ratio:>20}")
    print(f"ms/frame, speed-ups and frame-cost ratios use {clock} time"
          + (" (process CPU seconds: robust on a shared machine)" if clock == "cpu" else ""))
    if beyond:
        print_extrapolation(fit, base, max(beyond), clock)


def print_extrapolation(fit: QuadraticFit | None, base: dict[int, float], frames: int, clock: str) -> None:
    """Vanilla's estimated time at ``frames``, or why the measurements cannot give one."""
    measured = ", ".join(str(T) for T in sorted(base))
    if fit is None:
        print(f"no estimate of vanilla at T={frames}: measured at {len(base)} length(s) ({measured}), and "
              "a + b*T + c*T^2 needs at least 3")
        return
    check = (f"worst miss {100 * fit.worst:.0f} % at T={fit.worst_at}" if len(base) > 3
             else "as many measurements as coefficients: nothing checks the fit")
    fitted = f"{fit.a:.3g} + {fit.b:.3g}*T + {fit.c:.3g}*T^2 (a, b, c >= 0, fitted to T = {measured}; {check})"
    if not estimates(fit):
        print(f"no estimate of vanilla at T={frames}: the best fit, {fitted}, misses a measurement by more than "
              f"{100 * MAX_MISS:.0f} %: the measurements do not follow a + b*T + c*T^2 (a disturbed measurement, "
              "or a cost of another form)")
        return
    print(f"(est.) vanilla at T={frames}: ~{fit(frames):.1f} s {clock}, extrapolated with {fitted}")
    if fit.c == 0:
        print("       the fit has no T^2 term (the dense attention's cost does not show at these lengths): a linear "
              "extrapolation, which the T^2 cost can only exceed")
    if fit.linear(frames) == 0:
        print("       the fit puts all of it in the T^2 term: no bound on the speed-up of a variant without it")
    else:
        print(f"       of which a + b*T (everything but the T^2 attention) is ~{fit.linear(frames):.1f} s: a variant "
              f"that keeps it cannot beat vanilla by more than ~{fit(frames) / fit.linear(frames):.1f}x at T={frames}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, one repeat")
    parser.add_argument("--tiny", action="store_true",
                        help=f"every row at lengths {TINY_LENGTHS} with windows {TINY_WINDOW}/{TINY_LONG_WINDOW} "
                             f"(vanilla up to {TINY_VANILLA_MAX}), one repeat, one thread, in this process: seconds; "
                             "for tests")
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
    if args.quick or args.tiny:
        args.repeats = 1
    if args.tiny:  # on a shared machine a second OMP thread mostly spin-waits for a core
        args.threads = args.threads or 1
    args.lengths = args.lengths or list(TINY_LENGTHS if args.tiny else QUICK_LENGTHS if args.quick else LENGTHS)
    return args


def rows_for(args: argparse.Namespace) -> list[Variant]:
    if args.tiny:
        return variants(TINY_WINDOW, TINY_LONG_WINDOW, TINY_VANILLA_MAX)
    return variants()


def main(argv: list[str] | None = None, rows: list[Variant] | None = None) -> int:
    """Prints the table; 1 when a row failed. ``rows``: the variants to run (default: those of the sizes
    asked for, filtered by ``--variants``), the baseline first."""
    args = parse_args(argv)
    rows = rows or rows_for(args)
    if args.worker is not None:
        variant = next(v for v in rows if v.name == args.worker)
        torch.set_flush_denormal(True)
        if args.allocator == "keep":
            keep_freed_memory()
        print(json.dumps(measure(variant, args.lengths[0], args.device, getattr(torch, args.dtype), args.repeats)))
        return 0

    baseline = rows[0].name
    rows = [v for v in rows if not args.variants or any(s in v.name for s in args.variants)]
    print(f"tiny Moshi dim={TINY_LM_KWARGS['dim']} layers={TINY_LM_KWARGS['num_layers']} "
          f"device={args.device} dtype={args.dtype} threads={args.threads or torch.get_num_threads()} "
          f"batch=1, forward+backward, base frozen, allocator={args.allocator}")
    if args.tiny:
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
    results: dict[tuple[str, int], dict] = {}
    for variant in rows:
        for T in args.lengths:
            results[(variant.name, T)] = run_row(variant, T, args)
            print(f"  {variant.name} T={T}: {results[(variant.name, T)]}", file=sys.stderr, flush=True)
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    print_table(results, rows, args.lengths, clock, baseline)
    failed = [key for key, r in results.items() if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(results)} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
