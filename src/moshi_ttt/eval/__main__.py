"""``python -m moshi_ttt.eval {loss,generate,recall}``: long-context evaluation of several models.

  loss      held-out loss by position (minute buckets + a finer curve), models side by side
  generate  streaming generation with LMGen from a held-out prompt, collapse phases per window
  recall    recall accuracy on the long-range recall set, by delay (+ late-position loss)

Models: ``--model NAME=MODEL`` (an export directory from ``python -m moshi_ttt.export``, a hub repo
id holding one, a run directory or a checkpoint), ``--model NAME=base:MODEL_YAML`` (frozen base, no
TTT) or ``--model NAME=run:RUN_DIR``, repeated. Everything is written under ``--out`` (markdown +
CSV/JSON + PNG; ``generate`` also a stereo WAV per model) and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from moshi_ttt.constants import FRAME_RATE

logger = logging.getLogger("moshi_ttt.eval")
DEFAULT_OUT = "outputs/eval/demo"


def _frames(args, default: int) -> int:
    if args.frames is not None and args.minutes is not None:
        raise ValueError("give --frames or --minutes, not both")
    if args.minutes is not None:
        return max(1, round(args.minutes * 60 * FRAME_RATE))
    return args.frames if args.frames is not None else default


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="NAME=SPEC",
                   help="NAME=MODEL (export dir, hub repo id, run dir, checkpoint) | NAME=base:MODEL_YAML "
                   "(repeat for several)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--base-dir", default=None,
                   help="load every model's base Moshi from this local checkpoint directory (model.source=dir)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: as configured)")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cmd_loss(args, models) -> None:
    from moshi_ttt.eval.plots import plot_loss_curves
    from moshi_ttt.eval.position_loss import LossComparison, position_losses
    from moshi_ttt.eval.samples import check_vocabulary, load_codes

    frames = _frames(args, 750)
    codes = load_codes(args.shards, frames, args.num_samples, args.min_frames, args.pack)
    logger.info("%d held-out sequence(s) of %d frames", codes.shape[0], frames)
    results = {}
    for name, model in models:
        check_vocabulary(codes, model, f"--shards {' '.join(args.shards)} (model {name})")
        results[name] = position_losses(model, codes, args.frames_per_bucket, args.batch_size)
        del model  # the next model is built only once this one is released
    table = LossComparison(results)
    out = Path(args.out)
    table.write_csv(out / "loss_by_position.csv")
    table.write_json(out / "loss_by_position.json")
    md = table.markdown()
    (out / "loss_by_position.md").write_text(md)
    plot_loss_curves(table.results, out / "loss_by_position.png")
    print(md, flush=True)


def _thresholds(items: list[str]):
    from dataclasses import fields

    from moshi_ttt.eval.phases import PhaseThresholds

    known = {f.name: f.type for f in fields(PhaseThresholds)}
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--threshold {item!r}: expected KEY=VALUE with KEY in {sorted(known)}")
        values[key] = int(value) if known[key] in (int, "int") else float(value)
    return PhaseThresholds(**values)


def _pieces(tokenizer: str | None):
    if tokenizer is None:
        return None
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    n = sp.get_piece_size()
    return lambda i: sp.id_to_piece(int(i)) if 0 <= i < n else f"<{i}>"


def cmd_generate(args, models) -> None:
    from moshi_ttt.eval.generate import generate_and_track
    from moshi_ttt.eval.phases import PHASES
    from moshi_ttt.eval.plots import plot_timeline
    from moshi_ttt.eval.samples import iter_samples

    frames = _frames(args, 1500)
    thresholds = _thresholds(args.threshold or [])
    samples = list(iter_samples(args.shards, args.sample + 1))
    if len(samples) <= args.sample:
        raise ValueError(f"{args.shards}: no sample #{args.sample} ({len(samples)} conversation(s))")
    prompt = samples[args.sample]
    silence = [int(x) for x in args.silence_tokens.split(",")] if args.silence_tokens else None
    pieces = _pieces(args.tokenizer)
    out = Path(args.out)
    rows = []
    from moshi_ttt.eval.models import parse_model_specs

    specs = {name: (kind, path) for name, kind, path in parse_model_specs(args.model)}
    mimis: dict = {}
    for name, model in models:
        logger.info("%s: generating %d frames from %s (prompt %d frames)", name, frames, prompt.key, args.prompt_frames)
        tl = generate_and_track(
            model, prompt.codes, frames, prompt_frames=min(args.prompt_frames, prompt.frames),
            window_frames=args.window_frames, temp=args.temp, temp_text=args.temp_text, top_k=args.top_k,
            top_k_text=args.top_k_text, use_sampling=not args.greedy, seed=args.seed, user=args.user,
            silence_tokens=silence, user_alignment=args.user_alignment, thresholds=thresholds, text_pieces=pieces,
            log_every=args.log_every)
        tl.config["prompt_key"] = prompt.key
        tl.config["model"] = name
        stem = out / f"generation_{_safe_name(name)}"
        tl.write_json(stem.with_suffix(".json"))
        tl.write_csv(stem.with_suffix(".csv"))
        plot_timeline(tl.to_dict(), stem.with_suffix(".png"), title=f"{name}: generation from {prompt.key}")
        _write_generation_wav(args, name, specs[name], tl, prompt.codes, stem.with_suffix(".wav"), mimis)
        rows.append((name, tl.summary()))
        del model
    fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    lines = [f"Generation: {frames} frames ({frames / FRAME_RATE:.0f} s) from {prompt.key}, first "
             f"{min(args.prompt_frames, prompt.frames)} frames teacher-forced; windows of {args.window_frames} frames", "",
             "| model | windows | " + " | ".join(PHASES) + " | silent | worst | final | "
             + " | ".join(f"{p} from (s)" for p in PHASES[1:]) + " | text entropy | repetition |",
             "| --- | ---: | " + " | ".join("---:" for _ in PHASES) + " | ---: | --- | --- | "
             + " | ".join("---:" for _ in PHASES[1:]) + " | ---: | ---: |"]
    for name, s in rows:
        lines.append(f"| {name} | {s['windows']} | " + " | ".join(str(s["phase_counts"][p]) for p in PHASES)
                     + f" | {s['phase_counts']['silent']} | {s['worst_phase']} | {s['final_phase']} | "
                     + " | ".join(fmt(s["onset_s"][p]) for p in PHASES[1:])
                     + f" | {s['mean_text_entropy']:.3f} | {s['mean_repetition_rate']:.3f} |")
    md = "\n".join(lines) + "\n"
    (out / "generation.md").write_text(md)
    (out / "generation_summary.json").write_text(json.dumps({n: s for n, s in rows}, indent=2))
    print(md, flush=True)


def _write_generation_wav(args, name: str, spec: tuple[str, str], timeline, prompt_codes, path: Path,
                          mimis: dict) -> None:
    """The generated conversation as a stereo WAV (Moshi left, user right) with the model's Mimi."""
    from moshi_ttt.data.codec import load_mimi
    from moshi_ttt.eval.audio import conversation_audio, user_codes_of, write_wav
    from moshi_ttt.eval.models import codec_of

    source = args.mimi
    if source is None:
        codec = codec_of(*spec)
        source = codec.mimi if codec is not None else None
    if source is None:
        logger.warning("%s: no WAV (cannot tell which Mimi the model was trained with; pass --mimi)", name)
        return
    if source not in mimis:
        mimis.clear()  # one codec in memory at a time
        mimis[source] = load_mimi(source, device="cpu")
    stereo = conversation_audio(mimis[source], timeline.audio_tokens, user_codes_of(timeline, prompt_codes))
    write_wav(path, stereo)
    logger.info("%s: %.1f s of audio -> %s", name, stereo.shape[1] / 24000, path)


def cmd_recall(args, models) -> None:
    from moshi_ttt.eval.plots import plot_recall
    from moshi_ttt.eval.position_loss import _json_safe
    from moshi_ttt.eval.recall import late_loss, recall_report

    results = {}
    for name, model in models:
        r = recall_report(model, args.shards, args.max_samples, args.batch_size, args.delay_bucket)
        if args.late_start is not None:
            r["late_loss"] = late_loss(model, args.shards, args.late_start, args.max_samples, args.batch_size)
            r["late_start_frame"] = args.late_start
        results[name] = r
        logger.info("%s: recall %.3f (chance %.3f) on %d sample(s)", name, r["overall"], r["chance"], r["num_samples"])
        del model
    out = Path(args.out)
    (out / "recall.json").write_text(json.dumps(_json_safe(results), indent=2))
    plot_recall(results, out / "recall.png")
    delays = sorted({d for r in results.values() for d in r["by_delay"]})
    late = args.late_start is not None
    lines = [f"Recall accuracy (teacher-forced argmax on the recalled tokens) on {', '.join(args.shards)}", "",
             "| model | overall | chance | text | audio | " + " | ".join(f"delay {d}" for d in delays)
             + (f" | loss after frame {args.late_start}" if late else "") + " |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in delays) + (" | ---:" if late else "") + " |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['overall']:.3f} | {r['chance']:.3f} | {r['text_accuracy']:.3f} | "
                     f"{r['audio_accuracy']:.3f} | " + " | ".join(
                         f"{r['by_delay'][d]:.3f}" if d in r["by_delay"] else "" for d in delays)
                     + (f" | {r['late_loss']:.3f}" if late else "") + " |")
    md = "\n".join(lines) + "\n"
    (out / "recall.md").write_text(md)
    print(md, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    sub = p.add_subparsers(dest="command", required=True)

    loss = sub.add_parser("loss", help="held-out loss by position, models side by side")
    _common(loss)
    loss.add_argument("--shards", required=True, nargs="+", help="held-out token shards (dir, glob or files)")
    loss.add_argument("--frames", type=int, default=None, help="frames per sequence (default 750 = 1 min)")
    loss.add_argument("--minutes", type=float, default=None, help="or: minutes per sequence")
    loss.add_argument("--num-samples", type=int, default=8, help="conversations (the first ones, in shard order)")
    loss.add_argument("--min-frames", type=int, default=1, help="skip conversations shorter than this")
    loss.add_argument("--pack", action="store_true",
                      help="join consecutive conversations end to end into --frames-long streams")
    loss.add_argument("--frames-per-bucket", type=int, default=750, help="frames per point of the curve (750 = 1 min)")
    loss.add_argument("--batch-size", type=int, default=1)

    gen = sub.add_parser("generate", help="streaming generation with collapse-phase tracking")
    _common(gen)
    gen.add_argument("--shards", required=True, nargs="+", help="conversations to take the prompt from")
    gen.add_argument("--sample", type=int, default=0, help="index of the prompt conversation (shard order)")
    gen.add_argument("--prompt-frames", type=int, default=125, help="teacher-forced frames (default 125 = 10 s)")
    gen.add_argument("--frames", type=int, default=None, help="frames to generate in all (default 1500 = 2 min)")
    gen.add_argument("--minutes", type=float, default=None, help="or: minutes")
    gen.add_argument("--window-frames", type=int, default=125, help="frames per analysis window (default 10 s)")
    gen.add_argument("--temp", type=float, default=0.8)
    gen.add_argument("--temp-text", type=float, default=0.7)
    gen.add_argument("--top-k", type=int, default=250)
    gen.add_argument("--top-k-text", type=int, default=25)
    gen.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--user", choices=("sample", "silence"), default="sample",
                     help="user streams: the prompt conversation's while it lasts, or silence after the prompt")
    gen.add_argument("--user-alignment", choices=("training", "live"), default="training",
                     help="training: user frame s-1 enters at step s, as LMModel.forward aligns it; live: frame s")
    gen.add_argument("--silence-tokens", default=None, help="8 comma-separated user codes for silence (default: "
                     "moshi's no-input token)")
    gen.add_argument("--tokenizer", default=None, help="sentencepiece model: decode each window's text")
    gen.add_argument("--threshold", action="append", metavar="KEY=VALUE", help="phase threshold override "
                     "(moshi_ttt.eval.phases.PhaseThresholds), e.g. salad_entropy=0.8")
    gen.add_argument("--log-every", type=int, default=750, help="progress log every N frames (0: never)")
    gen.add_argument("--mimi", default=None, help="Mimi that decodes each generation into generation_NAME.wav "
                     "(default: the one each model was trained with)")

    rec = sub.add_parser("recall", help="recall accuracy on the long-range recall set, by delay")
    _common(rec)
    rec.add_argument("--shards", required=True, nargs="+", help="recall set(s) (python -m moshi_ttt.data.recall)")
    rec.add_argument("--max-samples", type=int, default=None)
    rec.add_argument("--batch-size", type=int, default=4)
    rec.add_argument("--delay-bucket", type=int, default=None, help="group delays into bins of N frames")
    rec.add_argument("--late-start", type=int, default=None, help="also report the loss over frames >= this")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    try:
        from moshi_ttt.data.shards import resolve_shards
        from moshi_ttt.eval.models import iter_models, parse_model_specs

        parse_model_specs(args.model)  # every bad argument fails before any model is built
        resolve_shards(args.shards)
        if getattr(args, "tokenizer", None) and not Path(args.tokenizer).exists():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer} does not exist")
        if args.command == "generate":
            _thresholds(args.threshold or [])
        if hasattr(args, "minutes"):
            _frames(args, 1)
        if args.base_dir and not Path(args.base_dir).is_dir():
            raise FileNotFoundError(f"--base-dir {args.base_dir} is not a directory")
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = {"source": "dir", "path": args.base_dir} if args.base_dir else None
    models = iter_models(args.model, base, args.device)  # built one at a time, as each is evaluated
    try:
        {"loss": cmd_loss, "generate": cmd_generate, "recall": cmd_recall}[args.command](args, models)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
