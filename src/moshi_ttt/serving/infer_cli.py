"""``python -m moshi_ttt.infer MODEL --input user.wav --out DIR``: an offline conversation with a trained model.

The user's recording (any sample rate; stereo is mixed to mono, or ``--channel N`` picks one) is streamed to the model
frame by frame, as the live server would (LMGen, TTT memory carried through the whole
conversation). DIR gets:

- ``conversation.wav``: stereo, 24 kHz, Moshi left and the user right;
- ``moshi.wav``: Moshi's side alone;
- ``text.json``: Moshi's text, as words and as tokens, with timestamps in seconds;
- ``settings.json``: the model, codec, sampling settings, seed and timings of the run.

Example (after ``make demo``)::

    python -m moshi_ttt.infer outputs/runs/demo --input data/generated/demo/audio/dialogue-0000.wav \\
        --channel 1 --out x/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("moshi_ttt.infer")


def build_parser() -> argparse.ArgumentParser:
    from moshi_ttt.serving.args import add_model_args, add_sampling_args

    p = argparse.ArgumentParser(prog="python -m moshi_ttt.infer", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    add_model_args(p)
    p.add_argument("--input", required=True, help="the user's audio (wav/flac/ogg, mono or stereo, any rate)")
    p.add_argument("--channel", type=int, default=None,
                   help="use this channel of the input as the user (e.g. 1: the user side of a moshi-finetune "
                   "stereo file); default: all channels mixed")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_args(p)
    return p


def _progress_bar(enabled: bool):
    """(callback, context) of a rich progress bar over frames."""
    import contextlib

    if not enabled:
        return None, contextlib.nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("conversation"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
                   TimeRemainingColumn())
    task = bar.add_task("frames", total=None)
    return (lambda done, total: bar.update(task, completed=done, total=total)), bar


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    from moshi_ttt.serving.args import device_of, load_from_args, sampling_kwargs
    from moshi_ttt.serving.offline import converse, read_user_audio

    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        user, info = read_user_audio(args.input, args.channel)
        device = device_of(args)
        sampling = sampling_kwargs(args)
        loaded = load_from_args(args, device)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    from moshi_ttt.data.audio import SAMPLE_RATE, write_stereo
    from moshi_ttt.serving.model import lm_gen_kwargs

    kwargs = lm_gen_kwargs(loaded, sampling)
    callback, bar = _progress_bar(not args.no_progress)
    with bar:
        conv = converse(loaded.lm, loaded.mimi, loaded.tokenizer, user, kwargs, seed=args.seed, progress=callback)
    out.mkdir(parents=True, exist_ok=True)
    write_stereo(out / "conversation.wav", conv.stereo(), SAMPLE_RATE)
    import soundfile as sf

    sf.write(str(out / "moshi.wav"), conv.moshi.clip(-1, 1), SAMPLE_RATE, subtype="PCM_16")
    (out / "text.json").write_text(json.dumps(conv.text_json(), indent=2, ensure_ascii=False))
    src = loaded.source
    settings = {
        "model": args.model, "model_kind": src.ref.kind, "ttt": src.ttt_cfg,
        "mimi": src.codec.mimi, "tokenizer": src.codec.tokenizer, "codec_from": src.codec.origin,
        "input": info, "device": device, "dtype": args.dtype, "seed": args.seed,
        "lm_gen": {k: v for k, v in kwargs.items() if k != "on_text_logits_hook"},
        "text_limited_to_tokenizer": "on_text_logits_hook" in kwargs,
        "frames": conv.frames, "seconds": conv.frames / 12.5, "wall_seconds": round(conv.seconds_wall, 3),
        "frames_per_second": round(conv.frames / max(conv.seconds_wall, 1e-9), 2),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    print(f"{conv.frames} frames ({conv.frames / 12.5:.1f} s) in {conv.seconds_wall:.1f} s "
          f"({settings['frames_per_second']} frames/s); {len(conv.words())} words -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
