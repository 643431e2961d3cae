"""Is it real time? Streaming inference frames per second for each TTT variant.

One frame = what the server does every 80 ms: Mimi encodes 1920 samples of the user, LMGen
takes one step (temporal transformer + depformer, TTT memory updated), Mimi decodes Moshi's
frame. Moshi needs 12.5 frames/s (80 ms per frame). Columns: the LM step alone and the whole
frame, as frames/s and ms/frame.

    python bench/streaming.py                         # tiny model on CPU (1 thread), every variant
    python bench/streaming.py --device cuda --size 7b # Moshi-7B-shaped (random weights, bf16) on a GPU
    python bench/streaming.py --tiny                  # every variant for a few frames, in seconds (tests)

On CPU, times are the process's CPU seconds (robust on a shared machine; single-threaded), on
CUDA wall seconds after a synchronize. The 7B shape is moshi's own default config
(``loaders._lm_kwargs``) and Mimi's (``loaders._mimi_config``), randomly initialised: speed does
not depend on the weights. Prints; asserts nothing about the speed, but a variant that fails prints
its error in the table and the exit status is 1.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "none (frozen base)": ["ttt=none"],
    "pre_attention": ["ttt=pre_attention"],
    "post_attention": ["ttt=post_attention"],
    "hybrid": ["ttt=hybrid"],
    "cache_replacement (add)": ["ttt=cache_replacement", "ttt.memory_read=add"],
    "cache_replacement (kv_slots)": ["ttt=cache_replacement", "ttt.memory_read=kv_slots"],
}


def ttt_config(overrides: list[str]) -> dict:
    """The variant's settings as the training config composes them (conf/ttt/*)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg.ttt, resolve=True)


# --tiny: a 4-frame window, so that a few frames write and read every memory (at the delta rule's one write
# per frame; minibatch_gd's 16 frames write once)
TINY_OVERRIDES = ["ttt.ttt_layer_attention_window=4"]


def build(size: str, variant: list[str], device: str, dtype: str, layers: list[int] | None):
    import yaml
    from moshi.models import loaders

    from moshi_ttt.data.codec import TINY_MIMI_CONFIG, build_tiny_mimi
    from moshi_ttt.models import build_model

    if size == "tiny":
        lm_kwargs = yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())["lm_kwargs"]
        mimi = build_tiny_mimi(TINY_MIMI_CONFIG, device=device)
    else:
        lm_kwargs = copy.deepcopy(loaders._lm_kwargs)
        mimi = loaders.get_mimi(None, copy.deepcopy(loaders._mimi_config), device=device, num_codebooks=8)
    ttt = ttt_config(variant + ([f"ttt.layer_indices=[{','.join(map(str, layers))}]"] if layers else []))
    model = build_model({"source": "tiny", "lm_kwargs": lm_kwargs, "device": device, "dtype": dtype}, ttt)
    with torch.no_grad():  # zero-initialised adapter projections made non-zero, as after training (same work)
        for p in model.parameters():
            if p.requires_grad and p.dim() >= 2 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.02)
            p.requires_grad_(False)
    return model.eval(), mimi.eval()


def _clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


@torch.no_grad()
def measure(model, mimi, frames: int, warmup: int, device: str) -> dict:
    from moshi.models.lm import LMGen

    gen = LMGen(model, use_sampling=True)
    chunk = 0.1 * torch.randn(1, 1, 1920, device=device)
    lm_s = total_s = 0.0
    with gen.streaming(1), mimi.streaming(1):
        for i in range(warmup + frames):
            t0 = _clock(device)
            codes = mimi.encode(chunk)
            t1 = _clock(device)
            out = gen.step(codes)
            t2 = _clock(device)
            if out is not None:
                mimi.decode(out[:, 1:])
            t3 = _clock(device)
            if i >= warmup:
                lm_s += t2 - t1
                total_s += t3 - t0
    return {"lm_fps": frames / lm_s, "lm_ms": 1000 * lm_s / frames, "fps": frames / total_s,
            "ms": 1000 * total_s / frames}


def run_row(name: str, args: argparse.Namespace, dtype: str, frames: int, layers: list[int] | None) -> str:
    """The variant's table row; ``FAILED: ...`` in it when building or streaming raised (traceback on stderr)."""
    try:
        overrides = VARIANTS[name] + (TINY_OVERRIDES if args.tiny else [])
        model, mimi = build(args.size, overrides, args.device, dtype, layers)
        r = measure(model, mimi, frames, args.warmup, args.device)
    except Exception as e:  # noqa: BLE001 - one failed row, reported in the table and the exit status
        traceback.print_exc()
        return f"| {name} | FAILED: {type(e).__name__}: {e} |".replace("\n", " ")
    return (f"| {name} | {r['lm_fps']:.1f} | {r['lm_ms']:.1f} | {r['fps']:.1f} | {r['ms']:.1f} | "
            f"{'yes' if r['fps'] >= 12.5 else 'no'} |")


def main(argv=None) -> int:
    """Prints the table; returns 1 when a variant failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny model, 12 frames after 4 warm-up, TTT layers' window 4: seconds; for tests")
    p.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 tiny, bfloat16 7b)")
    p.add_argument("--frames", type=int, default=None, help="measured frames (default 150 CPU, 500 CUDA)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--layers", default=None, help="TTT layer indices, e.g. 24,28,31 (default: the config's)")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if not cuda:
        torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.tiny:
        args.size, args.frames, args.warmup = "tiny", 12, 4
    dtype = args.dtype or ("bfloat16" if args.size == "7b" else "float32")
    frames = args.frames or (500 if cuda else 150)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    names = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    where = torch.cuda.get_device_name() if cuda else f"CPU, 1 thread ({os.cpu_count()} cores)"
    clock = "wall" if cuda else "process CPU"
    print(f"Streaming inference, {args.size} model ({dtype}) on {where}: {frames} frames after {args.warmup} "
          f"warm-up, {clock} time. Real time = 12.5 frames/s (80 ms/frame).\n")
    print("| variant | LM step frames/s | LM step ms | whole frame frames/s | whole frame ms | real time |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    failed = 0
    for name in names:
        row = run_row(name, args, dtype, frames, layers)
        if cuda:  # the variant's model is gone: give its memory back before the next one
            torch.cuda.empty_cache()
        failed += "FAILED" in row
        print(row, flush=True)
    if failed:
        print(f"{failed} of {len(names)} variants failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
