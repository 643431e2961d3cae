"""Data pipeline throughput: preparing audio into shards, and delivering sequences to a training step.

Why: preparation must keep up with a corpus of thousands of hours (seconds of audio per second
of wall time, per worker and device), and the reader must feed a training step faster than it
consumes (frames per second through a DataLoader with 2 workers). Printed tables only, never
timed assertions; a row that fails prints its error and the exit status is 1.

    python bench/data.py                                   # tiny Mimi on CPU
    python bench/data.py --tiny                            # every row on 2 s of audio, in seconds (tests)
    python bench/data.py --device cuda --mimi kyutai/moshiko-pytorch-bf16 \
        --tokenizer kyutai/moshiko-pytorch-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from moshi_ttt.data.alignment import MAIN_SPEAKER, OTHER_SPEAKER  # noqa: E402
from moshi_ttt.data.codec import StereoEncoder, load_mimi  # noqa: E402
from moshi_ttt.data.demo_dataset import train_tokenizer  # noqa: E402
from moshi_ttt.data.dialogue import corpus  # noqa: E402
from moshi_ttt.data.prepare import prepare  # noqa: E402
from moshi_ttt.data.stream import TokenSequenceDataset  # noqa: E402
from moshi_ttt.data.synthetic import write_synthetic_shards  # noqa: E402


def make_corpus(directory: Path, num: int, seconds: float, seed: int = 0) -> Path:
    """Stereo conversations (tone bursts vs noise bursts) with a word every 0.4 s on each channel."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num):
        t = np.arange(int(seconds * 24_000)) / 24_000
        moshi = 0.3 * np.sin(2 * np.pi * (150 + 100 * rng.random()) * t) * (np.sin(2 * np.pi * 0.6 * t) > 0)
        user = rng.normal(0, 0.1, t.size) * (np.sin(2 * np.pi * 0.5 * t + 1) > 0)
        path = directory / f"conv-{i:04d}.wav"
        sf.write(path, np.stack([moshi, user]).T, 24_000, subtype="PCM_16")
        words = [
            ["hello", [s, s + 0.3], MAIN_SPEAKER if k % 2 == 0 else OTHER_SPEAKER]
            for k, s in enumerate(np.arange(0.2, seconds - 0.5, 0.4))
        ]
        path.with_suffix(".json").write_text(json.dumps({"alignments": words}))
        lines.append(json.dumps({"path": path.name, "duration": seconds}))
    manifest = directory / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def bench_encoder(mimi_source: str, device: str, seconds: float, batch: int, repeats: int = 3) -> dict:
    mimi = load_mimi(mimi_source, device=device)
    enc = StereoEncoder(mimi)
    audio = [
        np.random.default_rng(i).normal(0, 0.1, (2, int(seconds * 24_000))).astype(np.float32)
        for i in range(batch)
    ]
    enc.encode(audio[:1])  # warm-up
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        enc.encode(audio)
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"audio_s": seconds * batch * repeats, "wall_s": elapsed}


def bench_prepare(
    manifest: Path, out: Path, tokenizer: str, mimi: str, device: str, workers: int, batch: int
) -> dict:
    start = time.perf_counter()
    result = prepare(
        [manifest],
        out,
        tokenizer,
        mimi,
        device=device,
        num_workers=workers,
        batch_size=batch,
        samples_per_shard=max(1, 8 // workers),
        progress=False,
        verbose=False,
    )
    elapsed = time.perf_counter() - start
    return {
        "audio_s": result.report["audio_hours"] * 3600,
        "wall_s": elapsed,
        "samples": result.report["samples"],
    }


def bench_loader(shards: Path, seq_len: int, batch: int, workers: int, seconds: float) -> dict:
    ds = TokenSequenceDataset(shards, seq_len=seq_len, resampled=True, shuffle_buffer=16)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        frames += int(np.prod(next(it)["codes"].shape[::2]))  # batch x seq_len
    elapsed = time.perf_counter() - start
    del it
    return {"frames": frames, "wall_s": elapsed}


def run_row(stage: str, setting: str, bench: Callable[[], str]) -> tuple[str, str, str]:
    """(stage, setting, throughput): ``bench()``'s, or ``FAILED: ...`` when it raised (traceback on stderr)."""
    try:
        return stage, setting, bench()
    except Exception as e:  # noqa: BLE001 - one failed row, reported in the table and the exit status
        traceback.print_exc()
        return stage, setting, f"FAILED: {type(e).__name__}: {e}".replace("\n", " ")[:100]


def main(argv=None) -> int:
    """Prints the table; returns 1 when a row failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="2 conversations of 2 s, short synthetic shards, seq_len 188, 0.3 s of loading: "
                        "seconds; for tests")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--mimi", default="tiny", help="tiny, a local .safetensors/dir, or a hub repo id")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: a demo one trained here)")
    p.add_argument("--num-convs", type=int, default=8)
    p.add_argument("--conv-seconds", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=4, help="conversations per Mimi batch")
    p.add_argument("--prepare-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[188, 750, 3750])
    p.add_argument("--loader-batch", type=int, default=4)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--loader-seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.tiny:
        args.num_convs, args.conv_seconds, args.batch_size = 2, 2.0, 2
        args.seq_lens, args.loader_seconds = [188], 0.3
    shard_frames = (200, 400) if args.tiny else (3750, 7500)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = args.tokenizer or str(train_tokenizer(corpus(0), tmp / "tok.model", 320))
        manifest = make_corpus(tmp / "corpus", args.num_convs, args.conv_seconds)

        def encode() -> str:
            r = bench_encoder(args.mimi, args.device, args.conv_seconds, args.batch_size)
            return f"{r['audio_s'] / r['wall_s']:.1f} audio s/s"

        rows.append(run_row("Mimi encode only", f"{args.mimi}, {args.device}, batch {args.batch_size}", encode))
        for workers in args.prepare_workers:
            def prep(workers: int = workers) -> str:
                r = bench_prepare(manifest, tmp / f"shards-{workers}", tokenizer, args.mimi, args.device, workers,
                                  args.batch_size)
                if r["samples"] != args.num_convs:
                    raise RuntimeError(f"prepared {r['samples']} of {args.num_convs} conversations")
                return f"{r['audio_s'] / r['wall_s']:.1f} audio s/s"

            rows.append(run_row("prepare (end to end)", f"{args.mimi}, {args.device}, {workers} worker(s) incl. "
                                f"start-up, {args.num_convs} x {args.conv_seconds:.0f} s", prep))
        long_shards = tmp / "long"
        write_synthetic_shards(
            long_shards,
            num_samples=64,
            num_frames=shard_frames,
            card=2048,
            text_card=32000,
            samples_per_shard=8,
        )
        for seq_len in args.seq_lens:
            def load(seq_len: int = seq_len) -> str:
                r = bench_loader(long_shards, seq_len, args.loader_batch, args.loader_workers, args.loader_seconds)
                return f"{r['frames'] / r['wall_s']:,.0f} frames/s"

            rows.append(run_row("TokenSequenceDataset",
                                f"seq_len {seq_len}, batch {args.loader_batch}, {args.loader_workers} workers", load))
    widths = [max(len(r[i]) for r in rows + [("stage", "setting", "throughput")]) for i in range(3)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(("stage", "setting", "throughput"), widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print(
        f"({os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'no GPU'})"
    )
    failed = sum(r[2].startswith("FAILED") for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
