"""The embedded default dataset: ``python -m moshi_ttt.data.demo_dataset OUT_DIR``.

So that ``make demo`` needs nothing from outside, everything is made here: synthetic
two-speaker dialogues (:mod:`moshi_ttt.data.dialogue`) spoken by espeak-ng word by word
(:mod:`moshi_ttt.data.espeak`), written in moshi-finetune's format (stereo 24 kHz wavs,
alignment jsons, a ``.jsonl`` manifest); a tiny sentencepiece model trained on their text,
with Moshi's special ids (0 = ``<unk>``, also Moshi's end-of-padding; 1/2 = ``<s>``/``</s>``;
3 = ``<pad>``, Moshi's text padding); a tiny Mimi saved as safetensors; and train/val token
shards prepared from them with :func:`moshi_ttt.data.prepare.prepare`, the same path a real
corpus takes.

Layout of OUT_DIR: ``audio/``, ``manifest_train.jsonl``, ``manifest_val.jsonl``,
``tokenizer.model``, ``mimi/`` (``mimi.safetensors`` + ``mimi_config.json``),
``shards/train/``, ``shards/val/``, ``dataset.json`` (what a model config must match).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from moshi_ttt.data.audio import SAMPLE_RATE, write_stereo
from moshi_ttt.data.dialogue import DialogueGenerator, corpus
from moshi_ttt.data.espeak import DEFAULT_VOICES, Timeline, WordSynth, alignment_json, require_espeak

logger = logging.getLogger(__name__)


def train_tokenizer(lines: list[str], path: str | Path, vocab_size: int = 320) -> Path:
    """A sentencepiece unigram model whose ids 0-3 are Moshi's special ids (see module docstring)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path


def synthesize_dialogue(
    index: int,
    seconds: float,
    synths: tuple[WordSynth, WordSynth],
    seed: int = 0,
    backchannel_prob: float = 0.2,
):
    """One dialogue of about ``seconds`` (the last turn is finished): (audio [2, S], words)."""
    rng = np.random.default_rng([seed, index])
    gen = DialogueGenerator(seed * 1_000_003 + index)
    timeline = Timeline(synths, rng)
    for turn in gen.turns():
        if timeline.seconds >= seconds:
            break
        back = gen.backchannel(1 - turn.speaker) if rng.random() < backchannel_prob else None
        timeline.add_turn(turn, backchannel=back)
    return timeline.render()


def write_dialogues(
    out_dir: str | Path,
    num_dialogues: int = 30,
    min_seconds: float = 20.0,
    max_seconds: float = 60.0,
    seed: int = 0,
    first_index: int = 0,
    manifest_name: str = "manifest.jsonl",
    synths: tuple[WordSynth, WordSynth] | None = None,
) -> Path:
    """Stereo wavs + alignment jsons under ``out_dir/audio`` and a manifest (paths relative to it)."""
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    synths = synths or (WordSynth(DEFAULT_VOICES[0]), WordSynth(DEFAULT_VOICES[1]))
    lengths = np.random.default_rng([seed, 7919]).uniform(
        min_seconds, max_seconds, size=first_index + num_dialogues
    )
    lines = []
    for i in range(first_index, first_index + num_dialogues):
        audio, words = synthesize_dialogue(i, float(lengths[i]), synths, seed)
        wav = out_dir / "audio" / f"dialogue-{i:04d}.wav"
        write_stereo(wav, audio)
        wav.with_suffix(".json").write_text(json.dumps(alignment_json(words)))
        lines.append(
            json.dumps({"path": str(wav.relative_to(out_dir)), "duration": audio.shape[1] / SAMPLE_RATE})
        )
    manifest = out_dir / manifest_name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def build_demo_dataset(
    out_dir: str | Path,
    num_dialogues: int = 30,
    num_val: int = 4,
    min_seconds: float = 20.0,
    max_seconds: float = 60.0,
    seed: int = 0,
    vocab_size: int = 320,
    samples_per_shard: int = 4,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Build the whole demo dataset under ``out_dir``; returns (and writes) ``dataset.json``."""
    from moshi_ttt.data.codec import TINY_MIMI_CONFIG, build_tiny_mimi, save_mimi
    from moshi_ttt.data.prepare import prepare

    require_espeak()
    if num_dialogues < 1 or not 0 <= num_val < num_dialogues:
        raise ValueError(
            f"need num_dialogues >= 1 and 0 <= num_val < num_dialogues, got {num_dialogues}, {num_val}"
        )
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    synths = (WordSynth(DEFAULT_VOICES[0]), WordSynth(DEFAULT_VOICES[1]))
    n_train = num_dialogues - num_val
    train_manifest = write_dialogues(
        out_dir, n_train, min_seconds, max_seconds, seed, 0, "manifest_train.jsonl", synths
    )
    val_manifest = (
        write_dialogues(
            out_dir, num_val, min_seconds, max_seconds, seed, n_train, "manifest_val.jsonl", synths
        )
        if num_val
        else None
    )
    tokenizer = train_tokenizer(corpus(seed), out_dir / "tokenizer.model", vocab_size)
    mimi_dir = save_mimi(build_tiny_mimi(TINY_MIMI_CONFIG, seed=seed), TINY_MIMI_CONFIG, out_dir / "mimi")
    common = dict(
        tokenizer=tokenizer,
        mimi=mimi_dir,
        num_workers=workers,
        device="cpu",
        samples_per_shard=samples_per_shard,
        prefix="demo",
        progress=progress,
    )
    train = prepare([train_manifest], out_dir / "shards" / "train", **common)
    val = prepare([val_manifest], out_dir / "shards" / "val", **common) if val_manifest else None

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    summary = {
        "text_card": int(sp.get_piece_size()),  # the LM's text_card must be at least this
        "card": int(TINY_MIMI_CONFIG["quantizer"]["bins"]),  # the LM's card must equal this
        "existing_text_padding_id": 3,
        "existing_text_end_padding_id": 0,
        "tokenizer": "tokenizer.model",
        "mimi": "mimi",
        "train_shards": "shards/train",
        "val_shards": "shards/val" if val else None,
        "train": {
            "samples": train.index.total_samples,
            "frames": train.index.total_frames,
            "hours": round(train.index.total_hours, 4),
            "skipped": train.report["skipped_total"],
        },
        "val": None
        if val is None
        else {
            "samples": val.index.total_samples,
            "frames": val.index.total_frames,
            "hours": round(val.index.total_hours, 4),
            "skipped": val.report["skipped_total"],
        },
        "settings": {
            "num_dialogues": num_dialogues,
            "num_val": num_val,
            "min_seconds": min_seconds,
            "max_seconds": max_seconds,
            "seed": seed,
            "vocab_size": vocab_size,
            "voices": [v.__dict__ for v in DEFAULT_VOICES],
        },
        "build_seconds": round(time.time() - start, 1),
    }
    (out_dir / "dataset.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moshi_ttt.data.demo_dataset", description=__doc__.splitlines()[0]
    )
    p.add_argument("out_dir")
    p.add_argument("--num-dialogues", type=int, default=30)
    p.add_argument("--num-val", type=int, default=4, help="dialogues held out for shards/val")
    p.add_argument("--min-seconds", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=320, help="upper bound; the corpus gives ~290 pieces")
    p.add_argument("--samples-per-shard", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = build_demo_dataset(
            args.out_dir,
            args.num_dialogues,
            args.num_val,
            args.min_seconds,
            args.max_seconds,
            args.seed,
            args.vocab_size,
            args.samples_per_shard,
            args.workers,
            progress=not args.no_progress,
        )
    except RuntimeError as exn:
        if "espeak-ng" in str(exn):
            print(f"error: {exn}", file=sys.stderr)
            return 1
        raise
    print(
        json.dumps({k: summary[k] for k in ("text_card", "card", "train", "val", "build_seconds")}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
