"""A long-range recall set: a fact stated early must be reproduced much later.

``python -m moshi_ttt.data.recall tokens OUT ...`` writes it at the token level (no audio,
thousands of frames per second of CPU): a random conversation-like stream in which a fixed
"fact cue" block is followed by a random fact block (text + 16 codebooks), and, after
``delay_frames``, a fixed "recall cue" block is followed by the very same fact block.

``python -m moshi_ttt.data.recall audio OUT --tokenizer ... --mimi ...`` speaks it with
espeak-ng: the user gives a code word, Moshi repeats it, small talk fills the delay, the
user asks for the code word and Moshi says it again; the conversation then goes through the
ordinary preparation path.

Every sample's ``meta.json`` holds ``fact_span`` and ``recall_span`` (``[start, end)``
frames of the fact and of its reproduction; for the audio set, the frames of the code word's
text tokens) and ``delay_frames`` (``recall_span[0] - fact_span[1]``), so that an evaluation
can score recall on exactly those tokens. The delay is chosen in seconds, or as
``context_frames`` plus some seconds, to put the fact beyond the attention window.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moshi_ttt.data.alignment import END_OF_TEXT_PADDING_ID, TEXT_PADDING_ID
from moshi_ttt.data.shards import FRAME_RATE, NUM_STREAMS, ShardIndex, TokenShardWriter, seconds_to_frames
from moshi_ttt.data.synthetic import synthetic_conversation


def delay_frames_for(
    delay_seconds: float | None = None, context_frames: int | None = None, beyond_seconds: float = 0.0
) -> int:
    """Frames between a fact and its recall: ``delay_seconds``, or the window plus ``beyond_seconds``."""
    if (delay_seconds is None) == (context_frames is None):
        raise ValueError("give either delay_seconds or context_frames (+ beyond_seconds)")
    if delay_seconds is not None:
        if delay_seconds <= 0:
            raise ValueError(f"delay_seconds must be positive, got {delay_seconds}")
        return seconds_to_frames(delay_seconds)
    if context_frames <= 0 or beyond_seconds < 0:
        raise ValueError(
            f"need context_frames > 0 and beyond_seconds >= 0, got {context_frames}, {beyond_seconds}"
        )
    return int(context_frames) + seconds_to_frames(beyond_seconds)


# ---- token level ----------------------------------------------------------------------------
@dataclass
class TokenRecallSpec:
    delay_frames: int  # frames from the end of the fact to the start of its recall
    fact_frames: int = 8
    cue_frames: int = 4
    fact_start: int = 25  # first frame of the fact cue (before jitter)
    fact_start_jitter: int = 50  # uniform extra offset, so the fact's absolute position varies
    tail_frames: int = 25
    card: int = 64
    text_card: int = 64
    text_padding_id: int = TEXT_PADDING_ID
    end_padding_id: int = END_OF_TEXT_PADDING_ID
    # True: the recall cue is the fact cue itself, so the fact is retrievable by content
    # (what follows this cue?) at any delay; False: two different fixed cues.
    same_cue: bool = False
    # "all": the fact is text + all 16 codebooks, reproduced whole; "text": the fact is its text
    # (words); the recall block's audio is fresh random tokens, so only its words can be recalled.
    fact_streams: str = "all"

    def check(self) -> None:
        if self.delay_frames < self.cue_frames:
            raise ValueError(
                f"delay_frames={self.delay_frames} must leave room for the {self.cue_frames}-frame cue"
            )
        if (
            min(self.fact_frames, self.cue_frames) < 1
            or min(self.fact_start, self.fact_start_jitter, self.tail_frames) < 0
        ):
            raise ValueError(f"invalid recall layout {self}")
        if self.fact_streams not in ("all", "text"):
            raise ValueError(f"fact_streams must be 'all' or 'text', got {self.fact_streams!r}")
        if self.text_card <= max(self.text_padding_id, self.end_padding_id) + 1:
            raise ValueError(f"text_card={self.text_card} leaves no word ids besides the special ones")
        if max(self.card, self.text_card) > np.iinfo(np.int16).max:
            raise ValueError("int16 token shards need card and text_card below 32768")


def _word_row(rng: np.random.Generator, n: int, spec: TokenRecallSpec) -> np.ndarray:
    """Text for a block: a word id every other frame, end-of-padding before each (Moshi's convention)."""
    low = max(spec.text_padding_id, spec.end_padding_id) + 1
    row = np.full(n, spec.text_padding_id, dtype=np.int64)
    row[0::2] = rng.integers(low, spec.text_card, size=len(row[0::2]))
    row[1:-1:2] = spec.end_padding_id
    return row


def _block(rng: np.random.Generator, n: int, spec: TokenRecallSpec) -> np.ndarray:
    block = np.empty((NUM_STREAMS, n), dtype=np.int64)
    block[0] = _word_row(rng, n, spec)
    block[1:] = rng.integers(0, spec.card, size=(NUM_STREAMS - 1, n))
    return block


def recall_cues(spec: TokenRecallSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The two fixed cue blocks ("remember this", "what was it?"), shared by every sample of a set
    (one block twice when ``spec.same_cue``)."""
    rng = np.random.default_rng([seed, 0xC0E])
    cues = _block(rng, spec.cue_frames, spec), _block(rng, spec.cue_frames, spec)
    if spec.same_cue:
        cues = cues[0], cues[0].copy()
    for cue in cues:  # the fact that follows a cue starts with a word: end the padding before it
        if cue[0, -1] == spec.text_padding_id:
            cue[0, -1] = spec.end_padding_id
    return cues


def token_recall_sample(
    rng: np.random.Generator, spec: TokenRecallSpec, cues: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, dict]:
    """One conversation (int16 ``[17, T]``) and its meta."""
    start = spec.fact_start + int(rng.integers(0, spec.fact_start_jitter + 1))
    fact_span = (start + spec.cue_frames, start + spec.cue_frames + spec.fact_frames)
    recall_span = (fact_span[1] + spec.delay_frames, fact_span[1] + spec.delay_frames + spec.fact_frames)
    total = recall_span[1] + spec.tail_frames
    codes = synthetic_conversation(rng, total, spec.card, spec.text_card, spec.text_padding_id).astype(
        np.int64
    )
    fact = _block(rng, spec.fact_frames, spec)
    codes[:, start : fact_span[0]] = cues[0]
    codes[:, fact_span[0] : fact_span[1]] = fact
    codes[:, recall_span[0] - spec.cue_frames : recall_span[0]] = cues[1]
    codes[:, recall_span[0] : recall_span[1]] = fact
    if spec.fact_streams == "text":
        codes[1:, recall_span[0] : recall_span[1]] = rng.integers(0, spec.card, size=(NUM_STREAMS - 1, spec.fact_frames))
    meta = {
        "task": "recall",
        "level": "tokens",
        "frames": total,
        "fact_span": list(fact_span),
        "recall_span": list(recall_span),
        "delay_frames": recall_span[0] - fact_span[1],
        "fact_cue_span": [start, fact_span[0]],
        "recall_cue_span": [recall_span[0] - spec.cue_frames, recall_span[0]],
        "fact_text": [int(x) for x in fact[0]],
    }
    if spec.fact_streams != "all":
        meta["fact_streams"] = spec.fact_streams
    return codes.astype(np.int16), meta


def write_token_recall_shards(
    out_dir: str | Path,
    num_samples: int,
    spec: TokenRecallSpec,
    seed: int = 0,
    samples_per_shard: int = 64,
    prefix: str = "recall",
    cue_seed: int | None = None,
) -> ShardIndex:
    """``num_samples`` token-level recall conversations as token shards (``index.json`` extra: ``recall``).

    The cues derive from ``cue_seed`` (default: ``seed``): sets written with different seeds but
    one ``cue_seed`` (train / held-out / pretraining splits) share their cues."""
    spec.check()
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    out_dir = Path(out_dir)
    _clear_previous(out_dir)
    cue_seed = seed if cue_seed is None else cue_seed
    cues = recall_cues(spec, cue_seed)
    index = ShardIndex(
        extra={
            "recall": {
                "level": "tokens",
                "seed": seed,
                "cue_seed": cue_seed,
                "num_samples": num_samples,
                "delay_seconds": spec.delay_frames / FRAME_RATE,
                **asdict(spec),
            }
        }
    )
    with TokenShardWriter(
        out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard, index=index
    ) as writer:
        for i in range(num_samples):
            codes, meta = token_recall_sample(np.random.default_rng([seed, i]), spec, cues)
            writer.write(f"{prefix}-{seed}-{i:07d}", codes, meta)
    return writer.index


# ---- associative recall (key -> value pairs, queried later) ----------------------------------
@dataclass
class PairsRecallSpec:
    """Multi-query associative recall in Moshi's text stream (audio: a constant silence code).

    A conversation states ``pairs`` key/value word pairs (one word per frame: k1 v1 k2 v2 ...),
    then ``gap`` frames of text padding, then asks every key again in a random order, each
    followed by its value. The scored tokens are the values of the queries: predicting one
    means finding where its key was stated and copying the word after it (an induction-style
    lookup), which attention can only do while the pairs are inside its window. ``gaps`` lists
    the gaps a set draws from (uniformly), so one set can mix inside- and beyond-window cases.
    """

    gaps: tuple[int, ...]
    pairs: tuple[int, ...] = (4,)  # pair counts a sample draws from
    num_keys: int = 28  # keys and values come from disjoint ranges of word ids
    # True: every value's frame also carries its key as the user's first audio codebook, so the
    # lookup is one attention hop (match the key, copy the word of that same frame) instead of an
    # induction over two frames; what is recalled is still only ever stated in the pairs block.
    key_in_audio: bool = False
    key_stream: int = 9  # the user's first codebook (delay 0, not predicted by Moshi)
    text_card: int = 64
    text_padding_id: int = TEXT_PADDING_ID
    end_padding_id: int = END_OF_TEXT_PADDING_ID

    def check(self) -> None:
        low = max(self.text_padding_id, self.end_padding_id) + 1
        if not self.gaps or min(self.gaps) < 0 or not self.pairs or min(self.pairs) < 1:
            raise ValueError(f"invalid pairs layout {self}: need gaps >= 0 and pairs >= 1")
        if self.key_in_audio and not 1 <= self.key_stream < NUM_STREAMS:
            raise ValueError(f"key_stream={self.key_stream} must be an audio stream in [1, {NUM_STREAMS - 1}]")
        if low + self.num_keys >= self.text_card or max(self.pairs) > self.num_keys:
            raise ValueError(f"num_keys={self.num_keys} and text_card={self.text_card} leave no room for values "
                             f"(or pairs={max(self.pairs)} exceeds the keys)")

    def frames(self) -> int:
        """Length of the longest conversation of the set."""
        return 1 + 4 * max(self.pairs) + max(self.gaps) + 2

    @property
    def value_ids(self) -> range:
        return range(max(self.text_padding_id, self.end_padding_id) + 1 + self.num_keys, self.text_card)


def pairs_recall_sample(rng: np.random.Generator, spec: PairsRecallSpec) -> tuple[np.ndarray, dict]:
    low = max(spec.text_padding_id, spec.end_padding_id) + 1
    n = int(rng.choice(spec.pairs))
    gap = int(rng.choice(spec.gaps))
    keys = low + rng.permutation(spec.num_keys)[:n]
    values = rng.choice(np.asarray(spec.value_ids), size=n)
    order = rng.permutation(n)
    stated = np.stack([keys, values], 1).reshape(-1)
    asked = np.stack([keys[order], values[order]], 1).reshape(-1)
    pad = spec.text_padding_id
    text = np.concatenate([[pad], stated, np.full(gap, pad), asked, [pad, pad]])
    codes = np.zeros((NUM_STREAMS, len(text)), dtype=np.int64)  # audio: one constant (silence) code
    codes[0] = text
    first_query = 1 + 2 * n + gap
    value_frames = [first_query + 2 * i + 1 for i in range(n)]
    if spec.key_in_audio:  # audio token ids are the key's word id (< text_card <= card)
        codes[spec.key_stream, 2 : 2 + 2 * n : 2] = keys
        codes[spec.key_stream, value_frames] = keys[order]
    meta = {
        "task": "recall",
        "level": "tokens",
        "layout": "pairs",
        "fact_streams": "text",
        "pairs": n,
        "gap_frames": gap,
        # the nearest stated pair is this far behind the first query (the farthest, 2 * pairs more)
        "delay_frames": first_query - (2 * n + 1) + 1,
        "fact_span": [1, 1 + 2 * n],
        "recall_span": [first_query, first_query + 2 * n],
        "recall_frames": value_frames,
        "key_in_audio": bool(spec.key_in_audio),
    }
    return codes.astype(np.int16), meta


def write_pairs_recall_shards(out_dir: str | Path, num_samples: int, spec: PairsRecallSpec, seed: int = 0,
                              samples_per_shard: int = 256, prefix: str = "pairs") -> ShardIndex:
    """``num_samples`` associative-recall conversations as token shards (``index.json`` extra: ``recall``)."""
    spec.check()
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    out_dir = Path(out_dir)
    _clear_previous(out_dir)
    index = ShardIndex(extra={"recall": {"level": "tokens", "layout": "pairs", "seed": seed,
                                         "num_samples": num_samples, **asdict(spec)}})
    with TokenShardWriter(out_dir, prefix=prefix, max_samples_per_shard=samples_per_shard, index=index) as writer:
        for i in range(num_samples):
            codes, meta = pairs_recall_sample(np.random.default_rng([seed, i, 0xA5]), spec)
            writer.write(f"{prefix}-{seed}-{i:07d}", codes, meta)
    return writer.index


def _clear_previous(out_dir: Path) -> None:
    """A rebuilt set replaces the old one: its listed shards go, so none lingers unindexed."""
    if (out_dir / "index.json").exists():
        for info in ShardIndex.load(out_dir).shards:
            (out_dir / info.name).unlink(missing_ok=True)


# ---- audio level ----------------------------------------------------------------------------
def speak_recall_conversation(
    index: int,
    delay_seconds: float,
    tokenize,
    synths,
    seed: int = 0,
    prefix_seconds: float = 6.0,
    tail_seconds: float = 4.0,
):
    """(audio [2, S], words, meta) for one spoken recall conversation; spans follow the text placement."""
    from moshi_ttt.data.alignment import place_words
    from moshi_ttt.data.codec import num_frames
    from moshi_ttt.data.dialogue import CODE_WORDS, DialogueGenerator, recall_turns
    from moshi_ttt.data.espeak import Timeline

    rng = np.random.default_rng([seed, index, 0xFAC7])
    gen = DialogueGenerator(seed * 1_000_003 + index + 500_000)
    turns = gen.turns()
    code_word = CODE_WORDS[int(rng.integers(len(CODE_WORDS)))]
    fact_turns, recall_questions = recall_turns(code_word)
    timeline = Timeline(synths, rng)
    while timeline.seconds < prefix_seconds:
        timeline.add_turn(next(turns))
    for turn in fact_turns:
        placed = timeline.add_turn(turn, overlap=False)
    fact_word = placed[-1]
    while timeline.seconds < fact_word.end + delay_seconds:
        timeline.add_turn(next(turns))
    for turn in recall_questions:
        placed = timeline.add_turn(turn, overlap=False)
    recall_word = placed[-1]
    end = timeline.seconds
    while timeline.seconds < end + tail_seconds:
        timeline.add_turn(next(turns))
    audio, words = timeline.render()
    frames = num_frames(audio.shape[1])
    text = place_words(words, frames, tokenize)
    spans = []
    for w in (fact_word, recall_word):
        placed_frames = text.word_frames.get(words.index(w), [])
        if len(placed_frames) != len(tokenize(w.text)):
            raise RuntimeError(f"recall conversation {index}: code word {w.text!r} did not fit the text grid")
        spans.append([placed_frames[0], placed_frames[-1] + 1])
    meta = {
        "task": "recall",
        "level": "audio",
        "code_word": code_word,
        "fact_span": spans[0],
        "recall_span": spans[1],
        "delay_frames": spans[1][0] - spans[0][1],
        "fact_audio_span": [math.floor(fact_word.start * FRAME_RATE), math.ceil(fact_word.end * FRAME_RATE)],
        "recall_audio_span": [
            math.floor(recall_word.start * FRAME_RATE),
            math.ceil(recall_word.end * FRAME_RATE),
        ],
        "fact_seconds": [fact_word.start, fact_word.end],
        "recall_seconds": [recall_word.start, recall_word.end],
    }
    return audio, words, meta


def build_audio_recall_set(
    out_dir: str | Path,
    tokenizer: str | Path,
    mimi: str | Path,
    num_samples: int,
    delay_seconds: float,
    seed: int = 0,
    samples_per_shard: int = 16,
    workers: int = 1,
    progress: bool = True,
):
    """Spoken recall conversations (wavs + alignments with ``meta``) prepared into ``out_dir/shards``."""
    from moshi_ttt.data.alignment import load_text_tokenizer, tokenize_word
    from moshi_ttt.data.audio import SAMPLE_RATE, write_stereo
    from moshi_ttt.data.espeak import DEFAULT_VOICES, WordSynth, alignment_json
    from moshi_ttt.data.prepare import prepare

    if num_samples < 1 or delay_seconds <= 0:
        raise ValueError(f"need num_samples >= 1 and delay_seconds > 0, got {num_samples}, {delay_seconds}")
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    sp = load_text_tokenizer(tokenizer)
    synths = (WordSynth(DEFAULT_VOICES[0]), WordSynth(DEFAULT_VOICES[1]))
    lines = []
    for i in range(num_samples):
        audio, words, meta = speak_recall_conversation(
            i, delay_seconds, lambda w: tokenize_word(sp, w), synths, seed
        )
        wav = out_dir / "audio" / f"recall-{i:05d}.wav"
        write_stereo(wav, audio)
        wav.with_suffix(".json").write_text(json.dumps(alignment_json(words, meta)))
        lines.append(
            json.dumps({"path": str(wav.relative_to(out_dir)), "duration": audio.shape[1] / SAMPLE_RATE})
        )
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return prepare(
        [manifest],
        out_dir / "shards",
        tokenizer,
        mimi,
        num_workers=workers,
        device="cpu",
        samples_per_shard=samples_per_shard,
        prefix="recall",
        progress=progress,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.data.recall", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="level", required=True)
    tok = sub.add_parser("tokens", help="token-level set (no audio), written straight to shards")
    aud = sub.add_parser("audio", help="espeak-spoken set, prepared like any corpus")
    for s in (tok, aud):
        s.add_argument("out_dir")
        s.add_argument("--num-samples", type=int, default=64)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument(
            "--delay-seconds", type=float, default=None, help="delay between the fact and its recall"
        )
        s.add_argument(
            "--context-frames", type=int, default=None, help="or: the attention window, in frames ..."
        )
        s.add_argument("--beyond-seconds", type=float, default=10.0, help="... plus this many seconds")
    tok.add_argument("--fact-frames", type=int, default=8)
    tok.add_argument("--cue-frames", type=int, default=4)
    tok.add_argument("--card", type=int, default=64, help="audio codebook size of the model (2048 for Moshi)")
    tok.add_argument(
        "--text-card", type=int, default=64, help="text vocabulary of the model (32000 for Moshi)"
    )
    tok.add_argument("--fact-streams", choices=("all", "text"), default="all",
                     help="all: the fact is text + 16 codebooks; text: only its words recur")
    tok.add_argument("--same-cue", action="store_true", help="recall cue = fact cue (content-addressable)")
    tok.add_argument("--samples-per-shard", type=int, default=64)
    aud.add_argument("--tokenizer", required=True)
    aud.add_argument("--mimi", required=True)
    aud.add_argument("--samples-per-shard", type=int, default=16)
    aud.add_argument("--workers", type=int, default=1)
    aud.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.delay_seconds is None and args.context_frames is None:
        p.error("give --delay-seconds or --context-frames")
    delay = delay_frames_for(
        args.delay_seconds,
        args.context_frames,
        args.beyond_seconds if args.context_frames is not None else 0.0,
    )
    if args.level == "tokens":
        spec = TokenRecallSpec(
            delay_frames=delay,
            fact_frames=args.fact_frames,
            cue_frames=args.cue_frames,
            card=args.card,
            text_card=args.text_card,
            same_cue=args.same_cue,
            fact_streams=args.fact_streams,
        )
        index = write_token_recall_shards(
            args.out_dir, args.num_samples, spec, args.seed, args.samples_per_shard
        )
        print(
            f"wrote {index.total_samples} recall conversations ({index.total_frames} frames, "
            f"delay {delay} frames) in {len(index.shards)} shard(s) under {args.out_dir}"
        )
        return 0
    try:
        result = build_audio_recall_set(
            args.out_dir,
            args.tokenizer,
            args.mimi,
            args.num_samples,
            delay / FRAME_RATE,
            args.seed,
            args.samples_per_shard,
            args.workers,
            progress=not args.no_progress,
        )
    except RuntimeError as exn:
        if "espeak-ng" in str(exn):
            print(f"error: {exn}", file=sys.stderr)
            return 1
        raise
    return 0 if result.report["samples"] else 2


if __name__ == "__main__":
    sys.exit(main())
