"""MODEL and sampling on the command line: the arguments ``serve`` and ``infer`` share."""

from __future__ import annotations

import argparse

import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL and how to load it: shared by serve and infer."""
    p.add_argument("model", metavar="MODEL", help="export directory, hub repo id, run directory or checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="LM weights (default: as the model was configured)")
    p.add_argument("--mimi", default=None, help="Mimi source (default: the one the model was trained with)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece tokenizer (default: the model's)")
    p.add_argument("--base-dir", default=None,
                   help="load the frozen base Moshi from this local checkpoint directory (no hub access)")
    p.add_argument("--revision", default=None, help="hub revision when MODEL is a repo id")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default on CPU: 1, since one streamed frame is too small to split)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """LMGen's sampling settings, named as moshi names them."""
    p.add_argument("--temp", type=float, default=0.8, help="audio sampling temperature (LMGen temp)")
    p.add_argument("--temp-text", type=float, default=0.7, help="text sampling temperature (LMGen temp_text)")
    p.add_argument("--top-k", type=int, default=250, help="audio top-k (LMGen top_k)")
    p.add_argument("--top-k-text", type=int, default=25, help="text top-k (LMGen top_k_text)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling (LMGen use_sampling=False)")


def sampling_kwargs(args) -> dict:
    for name in ("temp", "temp_text"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    for name in ("top_k", "top_k_text"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    return {"temp": args.temp, "temp_text": args.temp_text, "top_k": args.top_k, "top_k_text": args.top_k_text,
            "use_sampling": not args.greedy}


def device_of(args) -> str:
    """The device to run on; on CPU also the thread count and flushing of subnormal floats."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be >= 1")
    if torch.device(device).type == "cpu":
        torch.set_num_threads(args.threads or 1)
        torch.set_flush_denormal(True)  # decaying fast weights produce subnormals: ~100x slower on x86
    elif args.threads:
        torch.set_num_threads(args.threads)
    return device


def load_from_args(args, device: str):
    from moshi_ttt.serving.model import load

    base = {"source": "dir", "path": args.base_dir} if args.base_dir else None
    return load(args.model, device=device, dtype=args.dtype, mimi=args.mimi, tokenizer=args.tokenizer,
                base_override=base, revision=args.revision)
