"""The delta-rule engine against the mini-batch scan: one memory, forward + backward, per frame.

Why: a memory written every frame is the one that recalls (``make memory-proof``), and the
mini-batch scan runs it one Python step per frame. The chunkwise engine (``moshi_ttt.ttt.delta``)
computes the same writes with T / 64 sequential steps; this prints what that buys on this CPU.

Rows: ``TTTMemory`` with 4 heads of 64, fp32, fresh state, at T frames, timed over forward +
backward of a scalar of its reads (best of ``--reps``), with

- ``delta``: ``rule=delta`` (chunks of 64, checkpoint groups of 16 chunks, the defaults);
- ``scan b=1``: ``rule=minibatch_gd`` at mini-batch 1 without LayerNorm and residual: the same
  function as ``delta`` (tests/test_delta_rule.py holds them equal), one step per frame;
- ``scan b=16``: ``rule=minibatch_gd`` at its defaults (mini-batch 16, inner LayerNorm, residual).

Memory per frame: ``kept`` is what the forward keeps for the backward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``, inputs included); ``peak`` is the process's peak RSS
growth over the step, in a fresh subprocess per row (``--no-peak`` skips it). ``scan b=1`` beyond
``--max-scan1`` frames is extrapolated linearly from its longest measured length (its cost per
frame is flat: one step per frame) and marked ``~``. Exit status 1 when a row fails.

    python bench/delta_rule.py                 # T = 750, 3750, 22500 (about 3 minutes on 2 cores)
    python bench/delta_rule.py --quick         # tiny sizes, seconds (tests/test_benches.py)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from moshi_ttt.ttt import TTTConfig, TTTMemory  # noqa: E402

ENGINES = {
    "delta": dict(rule="delta"),
    "scan b=1": dict(rule="minibatch_gd", mini_batch_size=1, inner_norm=False, inner_residual=False,
                     per_position_lr=False),
    "scan b=16": dict(rule="minibatch_gd"),
}


def make_inputs(T: int, heads: int, head_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(1, heads, T, head_dim, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, heads, T, head_dim, generator=g), dim=-1)
    v = torch.randn(1, heads, T, head_dim, generator=g)
    lr = 0.02 * torch.rand(1, heads, T, generator=g)
    return [t.requires_grad_() for t in (q, k, v, lr)]


def make_memory(engine: str, heads: int, head_dim: int) -> TTTMemory:
    torch.manual_seed(0)
    return TTTMemory(TTTConfig(num_heads=heads, head_dim=head_dim, **ENGINES[engine]), head_dim)


def step(memory: TTTMemory, inputs) -> None:
    out, _ = memory(*inputs)
    out.square().mean().backward()


def time_step(engine: str, T: int, heads: int, head_dim: int, reps: int) -> float:
    memory, inputs = make_memory(engine, heads, head_dim), make_inputs(T, heads, head_dim)
    step(memory, make_inputs(min(T, 128), heads, head_dim))  # first calls pay one-off setup: not timed
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        step(memory, inputs)
        best = min(best, time.perf_counter() - start)
    return best


def kept_bytes(engine: str, T: int, heads: int, head_dim: int) -> int:
    memory, inputs = make_memory(engine, heads, head_dim), make_inputs(T, heads, head_dim)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = memory(*inputs)
    out.square().mean().backward()
    return sum(seen.values())


def peak_bytes(engine: str, T: int, heads: int, head_dim: int) -> int:
    """Peak RSS growth of one step, measured in a fresh process (the high-water mark is per process)."""
    code = (f"import sys; sys.argv = ['x']; sys.path.insert(0, {str(REPO / 'bench')!r}); import delta_rule as b; "
            f"b.print_peak({engine!r}, {T}, {heads}, {head_dim})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "peak run failed")
    return int(done.stdout.strip().splitlines()[-1])


def print_peak(engine: str, T: int, heads: int, head_dim: int) -> None:
    torch.set_num_threads(2)
    memory, inputs = make_memory(engine, heads, head_dim), make_inputs(T, heads, head_dim)
    step(memory, make_inputs(min(T, 128), heads, head_dim))  # warm up allocator and kernels
    # ru_maxrss keeps the import's high-water mark, which a step may never pass: reset the kernel's
    # mark (Linux: "5" > /proc/self/clear_refs) and read it back (VmHWM) against the RSS before the step
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step(memory, inputs)
    print((_status_kib("VmHWM") - before) * 1024)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(args) -> list[dict]:
    rows = []
    for T in args.lengths:
        for engine in ENGINES:
            row = {"engine": engine, "T": T, "extrapolated": False}
            try:
                if engine == "scan b=1" and T > args.max_scan1:
                    base = max(t for t in args.lengths if t <= args.max_scan1)
                    measured = next(r for r in rows if r["engine"] == engine and r["T"] == base)
                    row.update(seconds=measured["seconds"] * T / base, extrapolated=True, kept=None, peak=None)
                else:
                    reps = args.reps if T * (16 if engine == "scan b=1" else 1) <= 30_000 else 1
                    row["seconds"] = time_step(engine, T, args.heads, args.head_dim, reps)
                    row["kept"] = kept_bytes(engine, T, args.heads, args.head_dim)
                    row["peak"] = None if args.no_peak else peak_bytes(engine, T, args.heads, args.head_dim)
            except Exception as exn:  # a failing row is reported, the rest still runs
                traceback.print_exc()
                row["error"] = f"{type(exn).__name__}: {exn}"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:.2f} KiB"


def render(rows: list[dict], args) -> str:
    by = {(r["engine"], r["T"]): r for r in rows}
    lines = [f"one memory, {args.heads} heads of {args.head_dim}, fp32, fwd+bwd, {torch.get_num_threads()} threads "
             f"(torch {torch.__version__})", "",
             f"{'engine':<10} {'T':>6} {'time':>9} {'ms/frame':>9} {'kept/frame':>12} {'peak/frame':>12} "
             f"{'vs delta':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['engine']:<10} {r['T']:>6}   FAIL {r['error']}")
            continue
        mark = "~" if r["extrapolated"] else " "
        delta = by.get(("delta", r["T"]), {}).get("seconds")
        ratio = f"{r['seconds'] / delta:.1f}x" if delta else "-"
        lines.append(f"{r['engine']:<10} {r['T']:>6} {mark}{r['seconds']:7.3f}s {1e3 * r['seconds'] / r['T']:9.4f} "
                     f"{_fmt_bytes(r['kept'] and r['kept'] / r['T']):>12} "
                     f"{_fmt_bytes(r['peak'] and r['peak'] / r['T']):>12} {ratio:>9}")
    lines += ["", "targets (issue: per-token memory at GPU speed):"]
    for T in args.lengths:
        d, s1, s16 = (by.get((e, T), {}).get("seconds") for e in ENGINES)
        if d and s1 and s16:
            lines.append(f"  T={T:>6}: scan b=1 / delta = {s1 / d:5.1f}x (>= 15 at 3750)   "
                         f"delta / scan b=16 = {d / s16:.2f} (<= 0.5)")
    deltas = [by.get(("delta", T)) for T in args.lengths]
    deltas = [r for r in deltas if r and "error" not in r]
    if len(deltas) > 1:
        per = [r["seconds"] / r["T"] for r in deltas]
        kept = [r["kept"] / r["T"] for r in deltas]
        lines.append(f"  delta per frame, longest / shortest: time {per[-1] / per[0]:.2f}, kept {kept[-1] / kept[0]:.2f}"
                     + (f", peak {deltas[-1]['peak'] / deltas[-1]['T'] / (deltas[0]['peak'] / deltas[0]['T']):.2f}"
                        if all(r.get("peak") for r in (deltas[0], deltas[-1])) else "") + " (<= 1.2)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[750, 3750, 22500])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-scan1", type=int, default=3750, help="longest T the per-frame scan is measured at")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peak", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): the same code paths")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.heads, args.head_dim, args.reps, args.max_scan1 = [48, 96], 2, 8, 1, 48
    torch.set_num_threads(args.threads)
    rows = measure(args)
    print(render(rows, args))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
