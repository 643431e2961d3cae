"""A long-range recall set: a fact stated early must be reproduced much later.

``python -m moshi_ttt.data.recall tokens OUT ...`` writes it at the token level (no audio,
thousands of frames per second of CPU): a random conversation-like stream in which a fixed
"fact cue" block is followed by a random fact block (text + 16 codebooks), and, after
``delay_frames``, a fixed "recall cue" block is followed by the very same fact block.

``python -m moshi_ttt.data.recall audio OUT --tokenizer ... --mimi ... --distances 750,3000,7500
--minutes 30`` writes long spoken conversations for the curriculum's long stages: the user states
several facts ("my dog is called juniper"), Moshi confirms each, small talk fills the time, and
each fact is asked for again and recalled at its distance (frames, inside, at and beyond the
attention window). The voices are espeak-ng's (word by word, exact word times) or any TTS given as
a command (``--tts "my_tts --text {text} --out {wav}"``); the conversations then go through the
ordinary preparation path with the model's Mimi and tokenizer.

Every token-level sample's ``meta.json`` holds ``fact_span`` and ``recall_span`` (``[start, end)``
frames of the fact and of its reproduction) and ``delay_frames`` (``recall_span[0] - fact_span[1]``);
a spoken conversation holds one such entry per fact under ``recalls`` (the frames of the value's
text tokens where Moshi confirms it and where it recalls it, plus the audio spans), so that an
evaluation can score recall on exactly those tokens. The delay is chosen in frames or seconds, or
as ``context_frames`` plus some seconds, to put the fact beyond the attention window.
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


# ---- audio level: long spoken conversations that ask for memory ------------------------------
#: About how long a spoken word (with its pause) and a pause between turns last (espeak-ng at 160-170 words per
#: minute): a recall starts when the question and the answer's first words, or half of the next
#: small-talk turn, would reach its distance, so that the recalled value lands near it.
WORD_SECONDS, TURN_GAP_SECONDS = 0.5, 0.5
#: Room a fact needs between its statement and the end of the conversation besides its distance.
RECALL_SLACK_SECONDS = 12.0


@dataclass(frozen=True)
class LongRecallSpec:
    """A spoken conversation in which the user states facts that Moshi recalls much later.

    One fact per entry of ``distances``: the frames between Moshi's confirmation of the fact's value
    and the value in its answer, chosen around the attention window (inside, at, well beyond). Small
    talk fills the time between; ``seconds`` (at most, the conversation is cut there) or, when None,
    just past the last recall. Facts are stated at random times that leave room for their recall.
    """

    distances: tuple[int, ...]
    seconds: float | None = None
    prefix_seconds: float = 6.0
    tail_seconds: float = 4.0
    backchannel_prob: float = 0.2

    def check(self) -> None:
        from moshi_ttt.data.dialogue import FACT_KINDS

        if not self.distances or min(self.distances) < 1:
            raise ValueError(f"distances={self.distances}: give at least one distance of >= 1 frame")
        if len(self.distances) > len(FACT_KINDS):
            raise ValueError(f"distances={self.distances}: at most {len(FACT_KINDS)} facts per conversation "
                             "(one of each kind)")
        if self.seconds is not None:
            need = self.prefix_seconds + max(self.distances) / FRAME_RATE + RECALL_SLACK_SECONDS + self.tail_seconds
            if self.seconds < need:
                raise ValueError(f"a {self.seconds:g} s conversation cannot hold a recall {max(self.distances)} "
                                 f"frames after its fact: it needs at least {need:.0f} s")

    def fact_times(self, rng: np.random.Generator) -> list[float]:
        """When each fact is to be stated (seconds), in the order of ``distances``."""
        d = [x / FRAME_RATE for x in self.distances]
        if self.seconds is None:  # the longest distance first, one fact every ~20 s
            order = sorted(range(len(d)), key=lambda i: -d[i])
            times = [0.0] * len(d)
            for k, i in enumerate(order):
                times[i] = self.prefix_seconds + 20.0 * k
            return times
        return [float(rng.uniform(self.prefix_seconds, self.seconds - self.tail_seconds - RECALL_SLACK_SECONDS - x))
                for x in d]


#: Draws of a conversation's fact times before giving up (in a short conversation with several facts a
#: draw can bunch the facts so that their recalls do not fit; the next draw is tried).
FIT_ATTEMPTS = 50


class _DoesNotFit(RuntimeError):
    pass


def speak_recall_conversation(index: int, spec: LongRecallSpec, tokenize, synths, seed: int = 0):
    """(audio [2, S], words, meta) of one spoken long recall conversation; ``meta["recalls"]`` holds,
    per fact, the text-stream frames of its value's tokens where Moshi confirms it (``fact_span``) and
    where it recalls it (``recall_span``), their distance (``delay_frames``) and the audio spans."""
    spec.check()
    for attempt in range(FIT_ATTEMPTS):
        try:
            return _speak_recall_conversation(index, spec, tokenize, synths, seed, attempt)
        except _DoesNotFit:
            continue
    raise RuntimeError(f"recall conversation {index}: the facts' recalls at {spec.distances} frames did not fit in "
                       f"{spec.seconds:g} s in {FIT_ATTEMPTS} draws: give longer --minutes or shorter --distances")


def _speak_recall_conversation(index: int, spec: LongRecallSpec, tokenize, synths, seed: int, attempt: int):
    from moshi_ttt.data.alignment import place_words
    from moshi_ttt.data.codec import num_frames
    from moshi_ttt.data.dialogue import FACT_KINDS, FACT_VALUES, DialogueGenerator, fact_turns
    from moshi_ttt.data.espeak import Timeline

    rng = np.random.default_rng([seed, index, 0xFAC7, attempt] if attempt else [seed, index, 0xFAC7])
    gen = DialogueGenerator(seed * 1_000_003 + index + 500_000 + 7919 * attempt)
    turns = gen.turns()
    n = len(spec.distances)
    kinds = [FACT_KINDS[int(k)] for k in rng.permutation(len(FACT_KINDS))[:n]]
    values = [FACT_VALUES[int(v)] for v in rng.permutation(len(FACT_VALUES))[:n]]
    times = spec.fact_times(rng)
    to_state = sorted(range(n), key=lambda i: times[i])
    timeline = Timeline(synths, rng)
    facts: dict[int, dict] = {}
    due: dict[int, float] = {}  # fact -> second at which its recall should start

    upcoming = [next(turns)]

    def filler():
        turn = upcoming.pop()
        upcoming.append(next(turns))
        back = gen.backchannel(1 - turn.speaker) if rng.random() < spec.backchannel_prob else None
        timeline.add_turn(turn, backchannel=back)

    def lead(i: int) -> float:  # from the question's start to the value in Moshi's answer
        _, recall, _, answer_at = fact_turns(kinds[i], values[i])
        return (len(recall[0].words) + answer_at) * WORD_SECONDS + 2 * TURN_GAP_SECONDS

    def stating(i: int) -> float:  # how long the user's statement and Moshi's confirmation take
        state, _, _, _ = fact_turns(kinds[i], values[i])
        return sum(len(turn.words) for turn in state) * WORD_SECONDS + 2 * TURN_GAP_SECONDS

    while to_state or due:
        t = timeline.seconds
        half_turn = (len(upcoming[0].words) * WORD_SECONDS + TURN_GAP_SECONDS) / 2
        ready = [i for i, when in due.items() if when - lead(i) <= t + half_turn]
        if ready:
            i = min(ready, key=lambda j: due[j])
            _, recall, _, answer_at = fact_turns(kinds[i], values[i])
            placed = [timeline.add_turn(turn, overlap=False) for turn in recall]
            facts[i]["recall_word"] = placed[-1][answer_at]
            del due[i]
        elif to_state and times[to_state[0]] <= t and not any(  # a recall due meanwhile would come late
                when - lead(j) <= t + stating(to_state[0]) for j, when in due.items()):
            i = to_state.pop(0)
            state, _, confirm_at, _ = fact_turns(kinds[i], values[i])
            placed = [timeline.add_turn(turn, overlap=False) for turn in state]
            facts[i] = {"user_word": placed[0][_value_position(state[0], values[i])],
                        "fact_word": placed[-1][confirm_at]}
            due[i] = facts[i]["fact_word"].end + spec.distances[i] / FRAME_RATE
        else:
            filler()
        if spec.seconds is not None and timeline.seconds > spec.seconds:
            raise _DoesNotFit()
    end = spec.seconds if spec.seconds is not None else timeline.seconds + spec.tail_seconds
    while timeline.seconds < end - 1.0:
        filler()
    audio, words = timeline.render(max_seconds=spec.seconds)
    frames = num_frames(audio.shape[1])
    text = place_words(words, frames, tokenize)

    def text_span(w, value: str) -> list[int]:
        """Frames of the value's own tokens in the text stream (its trailing punctuation left out: the
        template predicts that, not the memory)."""
        pieces, placed_frames = tokenize(w.text), text.word_frames.get(words.index(w), [])
        if len(placed_frames) != len(pieces):
            raise RuntimeError(f"recall conversation {index}: the value {w.text!r} did not fit the text grid")
        own = tokenize(value)
        k = len(own) if list(pieces[: len(own)]) == list(own) else len(pieces)
        return [placed_frames[0], placed_frames[k - 1] + 1]

    def audio_span(w) -> list[int]:
        return [math.floor(w.start * FRAME_RATE), math.ceil(w.end * FRAME_RATE)]

    recalls = []
    for i in range(n):
        f, r, u = facts[i]["fact_word"], facts[i]["recall_word"], facts[i]["user_word"]
        fact_span, recall_span = text_span(f, values[i]), text_span(r, values[i])
        recalls.append({
            "kind": kinds[i].name, "value": values[i],
            "fact_span": fact_span, "recall_span": recall_span,
            "delay_frames": recall_span[0] - fact_span[1], "target_delay_frames": int(spec.distances[i]),
            "fact_audio_span": audio_span(f), "recall_audio_span": audio_span(r),
            "user_fact_audio_span": audio_span(u),
            "fact_seconds": [f.start, f.end], "recall_seconds": [r.start, r.end],
        })
    recalls.sort(key=lambda x: x["recall_span"][0])
    meta = {"task": "recall", "level": "audio", "layout": "long", "seconds": round(audio.shape[1] / 24_000, 3),
            "recalls": recalls}
    return audio, words, meta


def _value_position(turn, value: str) -> int:
    return next(k for k, w in enumerate(turn.words) if w.rstrip(".,?!") == value)


def conversation_settings(spec: LongRecallSpec, seed: int, tts: str | None) -> dict:
    """What decides a conversation's audio: a rerun with the same settings keeps the files it finds."""
    return json.loads(json.dumps({"spec": asdict(spec), "seed": seed, "tts": tts or "espeak"}))


_GENERATOR: dict = {}


def _write_conversation(job: tuple) -> str:
    """Speak conversation ``i`` into ``out_dir/audio`` (wav + alignment json with ``meta``); the manifest
    line. Reuses files written with the same settings (a rerun resumes)."""
    from moshi_ttt.data.alignment import load_text_tokenizer, tokenize_word
    from moshi_ttt.data.audio import SAMPLE_RATE, write_stereo
    from moshi_ttt.data.espeak import alignment_json, make_voices

    out_dir, i, spec, seed, tts, tokenizer = job
    wav = Path(out_dir) / "audio" / f"recall-{i:05d}.wav"
    settings = conversation_settings(spec, seed, tts)
    align = wav.with_suffix(".json")
    if wav.exists() and align.exists():
        try:
            old = json.loads(align.read_text())
            if old.get("meta", {}).get("settings") == settings:
                return json.dumps({"path": str(wav.relative_to(out_dir)), "duration": old["meta"]["seconds_exact"]})
        except (ValueError, KeyError):
            pass
    key = (tts, str(tokenizer))
    if _GENERATOR.get("key") != key:
        sp = load_text_tokenizer(tokenizer)
        _GENERATOR.update(key=key, voices=make_voices(tts), tokenize=lambda w: tokenize_word(sp, w))
    audio, words, meta = speak_recall_conversation(i, spec, _GENERATOR["tokenize"], _GENERATOR["voices"], seed)
    meta["settings"] = settings
    meta["seconds_exact"] = audio.shape[1] / SAMPLE_RATE
    write_stereo(wav, audio)
    align.write_text(json.dumps(alignment_json(words, meta)))
    return json.dumps({"path": str(wav.relative_to(out_dir)), "duration": audio.shape[1] / SAMPLE_RATE})


def build_audio_recall_set(
    out_dir: str | Path,
    tokenizer: str | Path,
    mimi: str | Path,
    num_samples: int,
    spec: LongRecallSpec,
    seed: int = 0,
    samples_per_shard: int = 16,
    workers: int = 1,
    progress: bool = True,
    tts: str | None = None,
    device: str = "auto",
):
    """Spoken recall conversations (wavs + alignments with ``meta``) prepared into ``out_dir/shards`` by
    the ordinary preparation path (``moshi_ttt.data.prepare``: the model's Mimi and tokenizer).
    ``tts``: None / ``espeak`` (espeak-ng, word by word) or a command template (``CommandTTS``).
    ``workers`` processes speak conversations side by side, then encode shards side by side; ``device``: where
    Mimi encodes (auto: CUDA when present)."""
    from moshi_ttt.data.espeak import make_voices, require_espeak
    from moshi_ttt.data.prepare import prepare

    if num_samples < 1:
        raise ValueError(f"need num_samples >= 1, got {num_samples}")
    spec.check()
    if tts in (None, "", "espeak", "espeak-ng"):
        require_espeak()
    else:
        make_voices(tts)  # a template without {text} / {wav} fails here, before any work
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), i, spec, seed, tts, str(tokenizer)) for i in range(num_samples)]
    if workers > 1 and num_samples > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, num_samples), mp_context=mp.get_context("spawn")) as pool:
            lines = list(pool.map(_write_conversation, jobs))
    else:
        lines = [_write_conversation(job) for job in jobs]
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return prepare(
        [manifest],
        out_dir / "shards",
        tokenizer,
        mimi,
        num_workers=workers,
        device=device,
        samples_per_shard=samples_per_shard,
        prefix="recall",
        progress=progress,
    )


def _distances(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exn:
        raise argparse.ArgumentTypeError(f"--distances {text!r}: comma-separated frame counts, e.g. 750,3000,7500") from exn
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--distances {text!r}: at least one distance, each >= 1 frame")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.data.recall", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="level", required=True)
    tok = sub.add_parser("tokens", help="token-level set (no audio), written straight to shards")
    aud = sub.add_parser("audio", help="long spoken conversations that ask for memory, prepared like any corpus")
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
    aud.add_argument("--distances", type=_distances, default=None,
                     help="frames from each fact to its recall, one fact each, e.g. 750,2250,3000,3750,7500,15000 "
                          "(inside, at and beyond Moshi's 3000-frame window); instead of --delay-seconds / "
                          "--context-frames, which give one fact")
    aud.add_argument("--minutes", type=float, default=None,
                     help="length of each conversation (it is cut there; default: just past the last recall)")
    aud.add_argument("--tts", default="espeak",
                     help="espeak (espeak-ng, word by word), or a command that speaks a turn: "
                          "\"my_tts --text {text} --out {wav}\" ({speaker}: 0 Moshi, 1 the user)")
    aud.add_argument("--tokenizer", required=True, help="the model's text tokenizer (path or hub repo id)")
    aud.add_argument("--mimi", required=True, help="the model's Mimi (tiny, a path or a hub repo id)")
    aud.add_argument("--samples-per-shard", type=int, default=16)
    aud.add_argument("--workers", type=int, default=1, help="processes that speak and encode side by side")
    aud.add_argument("--device", default="auto", help="where Mimi encodes: auto (cuda when present), cpu, cuda, cuda:N")
    aud.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.level == "audio" and args.distances is not None:
        delay = None
    elif args.delay_seconds is None and args.context_frames is None:
        p.error("give --delay-seconds or --context-frames" + (" (or --distances)" if args.level == "audio" else ""))
    else:
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
    spec = LongRecallSpec(distances=args.distances or (delay,),
                          seconds=None if args.minutes is None else args.minutes * 60)
    try:
        spec.check()
        result = build_audio_recall_set(
            args.out_dir,
            args.tokenizer,
            args.mimi,
            args.num_samples,
            spec,
            args.seed,
            args.samples_per_shard,
            args.workers,
            progress=not args.no_progress,
            tts=args.tts,
            device=args.device,
        )
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    except RuntimeError as exn:
        if "espeak-ng" in str(exn) or "--tts" in str(exn):
            print(f"error: {exn}", file=sys.stderr)
            return 1
        raise
    return 0 if result.report["samples"] else 2


if __name__ == "__main__":
    sys.exit(main())
