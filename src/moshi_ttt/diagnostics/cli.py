"""``python -m moshi_ttt.diagnose``: the lab notes' checks on models, as a markdown report with PNG plots.

Runs on one or more models (base or trained) and writes a report per model (and a W&B run with
``--wandb``).

Checks (``--checks``, default all): ``rope`` (positions and relative distances reached vs the
trained context and max_period), ``context`` (attention window / KV-cache capacity per layer vs
the intended length: wraparound), ``ttt_usage`` (gates near zero, output change with TTT off),
``ttt_health`` (fast-weight norm/mean/std and inner lr over the stream, divergence), ``drift``
(normalisation-input drift, residual-norm jumps by position), ``predictions`` (text/audio entropy
by position, repetition and distinct-n over time). The long-stream checks run the model in
streaming mode, chunk by chunk (linear in the length). Without ``--pack`` each sequence is one
conversation from ``--shards``; the stream stops where the shortest one ends (padding is never
streamed or counted), so ``--pack`` is what reaches a long ``--frames`` with short conversations.

Example (after ``make demo``)::

    python -m moshi_ttt.diagnose --model demo=run:outputs/runs/demo \\
        --shards data/generated/demo/shards/val --minutes 5 --pack
    python -m moshi_ttt.diagnose --model base=base:conf/model/tiny.yaml --synthetic --frames 3750 \\
        --out outputs/diagnostics/tiny_base --wandb

Models: ``--model NAME=MODEL | NAME=base:MODEL_YAML`` with MODEL an export directory, a hub repo id,
a run directory or a checkpoint, as ``serve`` and ``infer`` take it (repeat for several,
built one at a time). Output: ``--out`` (default ``outputs/diagnostics/NAME``; with several models
``OUT/NAME``) holds ``report.json``, ``report.md`` and ``<check>.png``. Exit status: 0 (even when
findings warn or fail: read the report), 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moshi_ttt.constants import FRAME_RATE

logger = logging.getLogger("moshi_ttt.diagnose")


def build_parser() -> argparse.ArgumentParser:
    from moshi_ttt.diagnostics.report import CHECKS

    p = argparse.ArgumentParser(prog="python -m moshi_ttt.diagnose", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", action="append", required=True, metavar="NAME=SPEC",
                   help="NAME=MODEL (export dir, hub repo id, run dir, checkpoint) | NAME=base:MODEL_YAML "
                   "(repeat for several)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", nargs="+", help="token shards to stream (dir, glob or files)")
    src.add_argument("--synthetic", action="store_true", help="stream structured random tokens instead")
    src.add_argument("--static-only", action="store_true", help="no stream: only the rope and context checks")
    p.add_argument("--frames", type=int, default=None, help="intended conversation length in frames "
                   "(12.5 per second; default 750 = 1 min)")
    p.add_argument("--minutes", type=float, default=None, help="or: in minutes")
    p.add_argument("--stream-frames", type=int, default=None,
                   help="stream only this many frames (default: the intended length)")
    p.add_argument("--num-samples", type=int, default=1, help="sequences streamed side by side (a batch)")
    p.add_argument("--pack", action="store_true", help="join consecutive conversations of --shards end to end "
                   "(without it the stream stops where the shortest conversation ends)")
    p.add_argument("--seed", type=int, default=0, help="seed of --synthetic")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="frames per streaming step (default: the TTT mini-batch size, else 16)")
    p.add_argument("--window-frames", type=int, default=125, help="frames per statistics window (default 10 s)")
    p.add_argument("--usage-frames", type=int, default=750, help="frames compared with TTT on vs off (default 1 min)")
    p.add_argument("--trained-context", type=int, default=None,
                   help="frames the base model was trained with (default: each layer's configured context)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--no-audio", action="store_true", help="skip the depformer (audio entropy/tokens)")
    p.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                   help="override a threshold (moshi_ttt.diagnostics.thresholds.Thresholds), e.g. jump_ratio=3")
    p.add_argument("--out", default=None, help="output directory (default outputs/diagnostics/NAME)")
    p.add_argument("--base-dir", default=None,
                   help="load every model's base Moshi from this local checkpoint directory (model.source=dir)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: as configured)")
    p.add_argument("--wandb", action="store_true", help="also log the report to W&B (offline without credentials)")
    p.add_argument("--wandb-project", default="moshi-ttt-diagnostics")
    return p


def intended_frames(args) -> int:
    if args.frames is not None and args.minutes is not None:
        raise ValueError("give --frames or --minutes, not both")
    if args.minutes is not None:
        if args.minutes <= 0:
            raise ValueError(f"--minutes={args.minutes} must be > 0")
        return max(1, round(args.minutes * 60 * FRAME_RATE))
    frames = args.frames if args.frames is not None else 750
    if frames < 1:
        raise ValueError(f"--frames={frames} must be >= 1")
    return frames


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def out_dirs(args, names: list[str]) -> dict[str, Path]:
    if args.out is None:
        return {n: Path("outputs/diagnostics") / _safe_name(n) for n in names}
    if len(names) == 1:
        return {names[0]: Path(args.out)}
    return {n: Path(args.out) / _safe_name(n) for n in names}


def validate(args):
    """Every argument checked before any model is built: (specs, settings, stream_frames, outs)."""
    from moshi_ttt.diagnostics.report import DiagnoseSettings
    from moshi_ttt.diagnostics.thresholds import parse_thresholds
    from moshi_ttt.eval.models import parse_model_specs

    specs = parse_model_specs(args.model)
    frames = intended_frames(args)
    if args.stream_frames is not None and args.stream_frames < 1:
        raise ValueError(f"--stream-frames={args.stream_frames} must be >= 1")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be >= 1")
    if not (args.shards or args.synthetic or args.static_only):
        raise ValueError("give a sequence source: --shards DIR, --synthetic or --static-only")
    if args.shards:
        from moshi_ttt.data.shards import resolve_shards

        resolve_shards(args.shards)
    if args.base_dir and not Path(args.base_dir).is_dir():
        raise FileNotFoundError(f"--base-dir {args.base_dir} is not a directory")
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    settings = DiagnoseSettings(frames=frames, chunk_frames=args.chunk_frames, window_frames=args.window_frames,
                                usage_frames=args.usage_frames, trained_context=args.trained_context,
                                audio=not args.no_audio, checks=checks, thresholds=parse_thresholds(args.threshold),
                                source=("synthetic tokens" if args.synthetic else "static only" if args.static_only
                                        else f"shards {' '.join(args.shards)}"))
    outs = out_dirs(args, [s[0] for s in specs])
    for out in outs.values():
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} exists and is not a directory")
    stream_frames = None if args.static_only else (args.stream_frames or frames)
    return specs, settings, stream_frames, outs


def sequences(args, model, frames: int):
    from moshi_ttt.diagnostics.sources import shard_codes, synthetic_codes
    from moshi_ttt.eval.samples import check_vocabulary

    if args.synthetic:
        codes, source = synthetic_codes(model, frames, args.num_samples, args.seed), "--synthetic"
    else:
        codes, source = shard_codes(args.shards, frames, args.num_samples, args.pack), f"--shards {args.shards}"
        short = int((codes[:, 0] >= 0).sum(-1).min())
        if short < frames:
            logger.warning("%s: a sequence has only %d frames of conversation of the %d asked: the stream stops "
                           "there, padding is never streamed (--pack joins consecutive conversations to fill it)",
                           source, short, frames)
    check_vocabulary(codes, model, source)
    return codes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        specs, settings, stream_frames, outs = validate(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    from moshi_ttt.diagnostics.report import run_diagnostics, write_report
    from moshi_ttt.eval.models import iter_models

    base = {"source": "dir", "path": args.base_dir} if args.base_dir else None
    spec_of = {name: f"{kind}:{path}" for name, kind, path in specs}
    for name, model in iter_models(args.model, base, args.device):
        try:  # bad shards / tokens that do not fit this model: a clear error before any compute
            codes = None if stream_frames is None else sequences(args, model, stream_frames)
        except (FileNotFoundError, ValueError) as exn:
            print(f"error: {exn}", file=sys.stderr)
            return 2
        report = run_diagnostics(model, codes, settings, name=name, spec=spec_of[name])
        del model
        written = write_report(report, outs[name])
        if args.wandb:
            from moshi_ttt.diagnostics.wandb_log import log_report

            log_report(report, outs[name], project=args.wandb_project)
        s = report["summary"]
        print(f"{name}: {s['status']} ({s['counts']['fail']} fail, {s['counts']['warn']} warn) -> {written['md']}")
        for line in s["flagged"]:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
