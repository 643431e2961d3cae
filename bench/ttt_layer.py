"""TTT layer forward+backward time and peak memory against sequence length.

The point is linear cost: time per token at 22 500 frames (30 min) should stay within 1.3x of
that at 750 frames (1 min), and peak memory should grow linearly (checkpoint groups keep only
the fast weights at group boundaries). A naive reference (each token's inner gradient taken by
torch.autograd.grad, every W_i built explicitly) is timed at short lengths for the speed-up.

    python bench/ttt_layer.py --quick                      # a short CPU run
    python bench/ttt_layer.py                              # the full table
    python bench/ttt_layer.py --device cuda --dtype bf16   # on a GPU, with FLOP/s against the card's peak
    python bench/ttt_layer.py --tiny                       # every row kind at toy lengths in seconds (tests)

On CPU every measurement runs in a fresh process so its peak RSS is its own, and times are the
process's CPU seconds (robust on a shared machine; run single-threaded); on CUDA times are wall
seconds and the peak is torch.cuda.max_memory_allocated. Times are the best of 2-5 runs.
FLOPs are matmul FLOPs counted by torch's FlopCounterMode on a short run (checkpoint recompute
included) and scaled per token. Prints; asserts nothing about the numbers, but a row that fails
prints its error and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moshi_ttt.ttt import TTTConfig, TTTLayer  # noqa: E402

LENGTHS = (188, 750, 3750, 22500)
TINY_LENGTHS = (16, 32)
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def build(inner: str, heads: int, head_dim: int, device: str, group: int) -> TTTLayer:
    # Sun et al.'s mini-batch rule, whatever the default: the naive reference below is its per-token form
    # (bench/delta_rule.py times the delta rule)
    cfg = TTTConfig(rule="minibatch_gd", num_heads=heads, head_dim=head_dim, inner=inner, checkpoint_group_size=group)
    layer = TTTLayer(cfg, heads * head_dim, name="bench").to(device)
    with torch.no_grad():  # a trained-looking output projection (zero init would hide nothing, but be odd)
        layer.out_proj.weight.normal_(0, 0.02)
    return layer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fwd_bwd(layer: TTTLayer, x: torch.Tensor, dtype: str, forward=None) -> torch.Tensor:
    """One training step's worth of work: forward, a scalar loss, backward."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        y = layer(x)[0] if forward is None else forward(layer, x)
    y.float().square().mean().backward()
    _sync(x.device.type)
    return y.detach()


def naive_forward(layer: TTTLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward with a per-token autograd loop instead of the dual-form scan."""
    c, mem, H, d = layer.config, layer.memory, layer.num_heads, layer.head_dim
    B, T, _ = x.shape
    b = mem.mini_batch_size
    q, k, v = (layer._heads(p(x)).float() for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if c.qk_l2_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    lr = mem.eta(F.linear(x.float(), layer.lr_proj.weight, layer.lr_proj.bias)).transpose(1, 2)
    tok = mem.token_eta(x.device)
    lnw, lnb = mem.ln_weight[None, :, None, :], mem.ln_bias[None, :, None, :]

    def f_ln(z):
        return F.layer_norm(z, (d,), eps=c.ln_eps) * lnw + lnb

    W = {n: p.unsqueeze(0).expand(B, *p.shape) for n, p in mem.initial.items()}
    rows = []
    for m0 in range(0, T, b):
        idx = range(m0, min(T, m0 + b))
        acc = {n: torch.zeros_like(w) for n, w in W.items()}
        for i in idx:
            ki, vi = k[:, :, i : i + 1], v[:, :, i : i + 1]
            loss = (
                0.5 * (f_ln(mem.inner.forward(W, ki)) - (vi - ki)).pow(2).sum()
            )  # sum over (B, H): separable
            grads = torch.autograd.grad(loss, list(W.values()), create_graph=True)
            acc = {n: acc[n] + lr[:, :, i, None, None] * g for n, g in zip(W, grads)}
            Wi = {n: W[n] - tok[i - m0] * acc[n] for n in W}
            qi = q[:, :, i : i + 1]
            rows.append(qi + f_ln(mem.inner.forward(Wi, qi)))
        if len(idx) == b:
            W = {n: W[n] - tok[b - 1] * acc[n] for n in W}
    out = torch.cat(rows, dim=2).transpose(1, 2).reshape(B, T, H * d)
    return torch.tanh(layer.gate_alpha) * layer.out_proj(layer.post_norm(out))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets the peak-RSS high-water mark of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(job: dict) -> dict:
    """Time and peak memory of one (inner, width, T); runs in its own process on CPU."""
    device, dtype, T = job["device"], job["dtype"], job["T"]
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    layer = build(job["inner"], job["heads"], job["head_dim"], device, job["group"])
    dim = layer.dim
    b = layer.memory.mini_batch_size
    fwd_bwd(layer, torch.randn(1, 2 * b, dim, device=device, requires_grad=True), dtype)  # lazy inits
    x = torch.randn(job["batch"], T, dim, device=device, requires_grad=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, tracked = _rss(), _reset_peak_rss()
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    t0 = clock()
    y = fwd_bwd(layer, x, dtype)
    times = [clock() - t0]
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base if tracked else float("nan")
    for _ in range(job["repeats"]):
        gc.collect()  # each timed run starts from the same heap
        t0 = clock()
        fwd_bwd(layer, x, dtype)
        times.append(clock() - t0)
    res = {"time": min(times), "peak": peak}
    if job["naive"]:
        fwd_bwd(layer, x[:, : 2 * b].detach().requires_grad_(), dtype, naive_forward)
        t0 = clock()
        y_ref = fwd_bwd(layer, x, dtype, naive_forward)
        res["naive_time"] = clock() - t0
        res["naive_err"] = float((y_ref.float() - y.float()).abs().max() / y.float().abs().max())
    if job["count_flops"]:
        from torch.utils.flop_counter import FlopCounterMode

        n = 8 * b
        xf = torch.randn(job["batch"], n, dim, device=device, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            fwd_bwd(layer, xf, dtype)
        res["flops_per_token"] = counter.get_total_flops() / n
    return res


def run_job(job: dict, isolate: bool) -> dict:
    """``measure(job)``, in a fresh process when ``isolate`` (its peak RSS is its own); a failure is
    ``{"error": ...}``, one row of the table, not the end of it."""
    try:
        if not isolate:
            return measure(job)
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(measure, job).result()
    except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
        return {"error": f"{type(e).__name__}: {e}".replace("\n", " ")[:100]}


def main(argv=None) -> int:
    """Prints the table; returns 1 when a row failed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--quick", action="store_true", help="short lengths, tiny width only")
    p.add_argument("--tiny", action="store_true",
                   help=f"lengths {TINY_LENGTHS}, tiny width only, one repeat, in this process: seconds; for tests")
    p.add_argument("--inner", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    p.add_argument("--lengths", nargs="+", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--moshi-heads",
        type=int,
        default=None,
        help="heads of 128 at Moshi width (default 32 on cuda, 2 on cpu)",
    )
    p.add_argument("--group", type=int, default=16, help="ttt.checkpoint_group_size")
    p.add_argument("--naive-max", type=int, default=None, help="longest T to time the naive reference at")
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (the scan is launch-bound: 1 is fastest)"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for the %% column"
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    lengths = args.lengths or (TINY_LENGTHS if args.tiny else (188, 750) if args.quick else LENGTHS)
    naive_max = args.naive_max if args.naive_max is not None else (
        lengths[0] if args.tiny else 188 if args.quick else 750)
    heads = args.moshi_heads or (32 if cuda else 2)
    widths = [("tiny 4x16", 4, 16)] + ([] if args.quick or args.tiny else [(f"moshi {heads}x128", heads, 128)])
    peak_tflops = args.peak_tflops
    if cuda and peak_tflops is None and args.dtype == "bf16":
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        print(f"device: {name}, bf16 dense peak {peak_tflops} TFLOP/s")
    jobs = []
    for inner in args.inner:
        for label, h, d in widths:
            for i, T in enumerate(lengths):
                jobs.append(
                    dict(
                        inner=inner, width=label, heads=h, head_dim=d, T=T, device=args.device, dtype=args.dtype,
                        batch=args.batch, group=args.group, threads=args.threads,
                        repeats=1 if args.tiny else 4 if T <= 750 else 2 if T <= 3750 else 1,
                        naive=T <= naive_max, count_flops=i == 0,
                    )
                )  # fmt: skip
    head = (
        f"{'inner':<7}{'width':<15}{'T':>7}{'fwd+bwd s':>11}{'peak MiB':>10}{'us/token':>10}{'vs 750':>8}"
        f"{'naive s':>9}{'speedup':>9}{'naive rel err':>14}{'GFLOP/s':>10}"
        + ("  % peak" if peak_tflops else "")
    )
    clock = "wall" if cuda else "CPU-time"
    print(
        f"device={args.device} dtype={args.dtype} batch={args.batch} threads={args.threads} "
        f"group={args.group} times={clock} seconds"
    )
    print(head)
    print("-" * len(head))
    per_token_750: dict[tuple, float] = {}
    flops: dict[tuple, float] = {}
    failed = 0
    for job in jobs:
        r = run_job(job, isolate=not (cuda or args.tiny))
        if "error" in r:
            failed += 1
            print(f"{job['inner']:<7}{job['width']:<15}{job['T']:>7}  FAILED: {r['error']}", flush=True)
            continue
        key = (job["inner"], job["width"])
        if "flops_per_token" in r:
            flops[key] = r["flops_per_token"]
        tpt = r["time"] / (job["T"] * job["batch"])
        if job["T"] == 750:
            per_token_750[key] = tpt
        rel = f"{tpt / per_token_750[key]:.2f}x" if key in per_token_750 else "-"
        naive = f"{r['naive_time']:.2f}" if "naive_time" in r else "-"
        speed = f"{r['naive_time'] / r['time']:.0f}x" if "naive_time" in r else "-"
        err = f"{r['naive_err']:.1e}" if "naive_err" in r else "-"
        rate = flops.get(key, float("nan")) * job["T"] * job["batch"] / r["time"]
        line = (
            f"{job['inner']:<7}{job['width']:<15}{job['T']:>7}{r['time']:>11.3f}{r['peak'] / 2**20:>10.1f}"
            f"{tpt * 1e6:>10.1f}{rel:>8}{naive:>9}{speed:>9}{err:>14}{rate / 1e9:>10.2f}"
        )
        if peak_tflops:
            line += f"{100 * rate / (peak_tflops * 1e12):>8.2f}"
        print(line, flush=True)
    if failed:
        print(f"{failed} of {len(jobs)} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
