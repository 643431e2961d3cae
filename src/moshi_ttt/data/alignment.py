"""Moshi's inner monologue: the main speaker's words on the 12.5 Hz frame grid.

The placement follows moshi-finetune's ``Interleaver`` (``keep_main_only=True``), so that a
model trained on our shards sees the text stream it was pretrained on:

- only words of the main speaker (channel 0, label ``SPEAKER_MAIN``) are kept, words with a
  non-positive duration are dropped;
- a word's tokens start at the first frame ``t`` with ``start * 12.5 < t + 1`` and are
  emitted one per frame; when the next word starts before they are all out, the rest is
  dropped (``keep_and_shift=False``, moshi-finetune's default) or queued (``keep_and_shift``);
- frames without text hold the text padding id (3), and the frame just before a token that
  follows padding holds the end-of-padding id (0).

Unlike moshi-finetune, dropped tokens are counted, so the preparation report can say how
much text the grid could not carry.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moshi_ttt.data.shards import FRAME_RATE

logger = logging.getLogger(__name__)

MAIN_SPEAKER = "SPEAKER_MAIN"
OTHER_SPEAKER = "SPEAKER_OTHER"
TEXT_PADDING_ID = 3  # LMModel.existing_text_padding_id: "no text on this frame"
END_OF_TEXT_PADDING_ID = 0  # LMModel.existing_text_end_padding_id: "a word starts on the next frame"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"  # moshi.models.loaders.TEXT_TOKENIZER_NAME


class AlignmentError(ValueError):
    """Alignments that cannot be trusted; ``reason`` is the report's category."""

    def __init__(self, reason: str, path: str | Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = str(path)
        self.detail = detail


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    speaker: str


def alignment_path_for(audio_path: str | Path) -> Path:
    """moshi-finetune's convention: ``a/b.wav`` is described by ``a/b.json``."""
    p = Path(audio_path)
    return p.with_suffix(".json")


def parse_alignments(raw, path: str | Path) -> list[Word]:
    """Words from ``{"alignments": [[word, [start, end], speaker], ...]}``, shape-checked."""
    if not isinstance(raw, dict) or "alignments" not in raw:
        raise AlignmentError("invalid_alignment", path, 'no "alignments" key')
    items = raw["alignments"]
    if not isinstance(items, list):
        raise AlignmentError("invalid_alignment", path, '"alignments" is not a list')
    words = []
    for i, item in enumerate(items):
        try:
            text, (start, end), speaker = item
            word = Word(str(text), float(start), float(end), str(speaker))
        except (TypeError, ValueError) as exn:
            raise AlignmentError(
                "invalid_alignment", path, f"alignments[{i}] = {item!r} is not [word, [start, end], speaker]"
            ) from exn
        if not (math.isfinite(word.start) and math.isfinite(word.end)):
            raise AlignmentError(
                "invalid_alignment", path, f"alignments[{i}] ({text!r}) has a non-finite time"
            )
        words.append(word)
    return words


def validate_words(words: Sequence[Word], duration: float, path: str | Path, tolerance: float = 0.5) -> None:
    """Refuse inverted or out-of-range timings: they mean the alignment belongs to another file."""
    for i, w in enumerate(words):
        if w.start > w.end:
            raise AlignmentError(
                "alignment_start_after_end",
                path,
                f"alignments[{i}] ({w.text!r}) starts at {w.start:.3f} s after it ends at {w.end:.3f} s",
            )
        if w.start < -tolerance or w.end > duration + tolerance:
            raise AlignmentError(
                "alignment_out_of_range",
                path,
                f"alignments[{i}] ({w.text!r}) spans [{w.start:.3f}, {w.end:.3f}] s outside the "
                f"{duration:.3f} s of audio",
            )


def load_alignments(path: str | Path, duration: float, tolerance: float = 0.5) -> tuple[list[Word], dict]:
    """Validated words and the file's optional ``meta`` dict (copied into each sample's meta)."""
    path = Path(path)
    if not path.exists():
        raise AlignmentError("missing_alignment", path, "alignment file not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise AlignmentError("invalid_alignment", path, f"unreadable JSON ({exn})") from exn
    words = parse_alignments(raw, path)
    validate_words(words, duration, path, tolerance)
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise AlignmentError("invalid_alignment", path, '"meta" must be an object')
    return words, meta


def tokenize_word(tokenizer, word: str) -> list[int]:
    """Token ids of one word, as moshi-finetune's ``tokenize(..., bos=False)`` computes them."""
    lines = word.strip().split("\n")
    pieces = tokenizer.encode(lines)
    if len(pieces) == 1:
        return list(pieces[0])
    newline = tokenizer.encode("\n")[-1]
    out: list[int] = list(pieces[0])
    for p in pieces[1:]:
        out += [newline, *p]
    return out


@dataclass
class TextStream:
    tokens: np.ndarray  # int64 [T]
    words: int = 0  # main-speaker words with a positive duration
    tokens_placed: int = 0
    tokens_dropped: int = 0  # tokens the grid could not carry (overlap or past the end)
    word_frames: dict[int, list[int]] = field(default_factory=dict)  # word index -> frames of its tokens


def place_words(
    words: Sequence[Word],
    num_frames: int,
    tokenize: Callable[[str], list[int]],
    frame_rate: float = FRAME_RATE,
    main_speaker: str = MAIN_SPEAKER,
    padding_id: int = TEXT_PADDING_ID,
    end_padding_id: int = END_OF_TEXT_PADDING_ID,
    keep_and_shift: bool = False,
    in_word_padding_id: int | None = None,
) -> TextStream:
    """The text stream ``[num_frames]`` for ``words`` (indices in ``word_frames`` refer to ``words``).

    ``in_word_padding_id`` fills the frames of a word after its tokens (moshi-finetune's
    ``in_word_padding``, by default the padding id itself).
    """
    in_word = padding_id if in_word_padding_id is None else in_word_padding_id
    order = sorted(range(len(words)), key=lambda i: words[i].start)
    kept = [i for i in order if words[i].speaker == main_speaker and words[i].start < words[i].end]
    toks = {i: tokenize(words[i].text) for i in kept}
    stream = np.full(num_frames, padding_id, dtype=np.int64)
    out = TextStream(stream, words=len(kept))
    pending: deque[tuple[int, int]] = deque()  # (word index, token id)
    last_word_end = -1
    k = 0
    for t in range(num_frames):
        while k < len(kept) and words[kept[k]].start * frame_rate < t + 1:
            i = kept[k]
            last_word_end = int(words[i].end * frame_rate)
            if not keep_and_shift:
                out.tokens_dropped += len(pending)
                pending.clear()
            pending.extend((i, tok) for tok in toks[i])
            k += 1
        if pending:
            if t > 0 and stream[t - 1] in (padding_id, in_word):
                stream[t - 1] = end_padding_id
            i, tok = pending.popleft()
            stream[t] = tok
            out.word_frames.setdefault(i, []).append(t)
            out.tokens_placed += 1
        elif t <= last_word_end:
            stream[t] = in_word
    out.tokens_dropped += len(pending) + sum(len(toks[i]) for i in kept[k:])
    return out


def locate_text_tokenizer(source: str | Path, revision: str | None = None) -> Path:
    """The ``.model`` file of a tokenizer given as a file, a checkpoint directory or a hub repo id."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        name = TOKENIZER_NAME
        config = path / "config.json"
        if config.exists():
            name = json.loads(config.read_text()).get("tokenizer_name", name)
        found = next((c for c in (path / name, path / "tokenizer.model") if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"tokenizer={path}: no {name} or tokenizer.model in this directory")
        return found
    if path.exists():
        return path
    if str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer={source}: no such file, and not a hub repo id (org/name)")
    return _fetch_from_hub(str(source), "tokenizer_name", TOKENIZER_NAME, revision)


def load_text_tokenizer(source: str | Path, revision: str | None = None):
    """The model's sentencepiece tokenizer (see :func:`locate_text_tokenizer` for sources)."""
    import sentencepiece

    path = locate_text_tokenizer(source, revision)
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as exn:  # noqa: BLE001 - sentencepiece raises OSError or RuntimeError
        raise ValueError(f"tokenizer={path}: not a sentencepiece model ({exn})") from exn
    check_special_ids(sp, str(path))
    return sp


def check_special_ids(sp, name: str) -> None:
    """Warn when ids 0 and 3 are ordinary pieces: the text stream would confuse them with padding."""
    for tid in (END_OF_TEXT_PADDING_ID, TEXT_PADDING_ID):
        if tid < sp.get_piece_size() and not (sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid)):
            logger.warning(
                "tokenizer %s: id %d (%r) is an ordinary piece but Moshi uses it as text padding",
                name,
                tid,
                sp.id_to_piece(tid),
            )


def _fetch_from_hub(repo: str, config_key: str, default_name: str, revision: str | None) -> Path:
    """One file of a Moshi hub repo, named by its config.json (as CheckpointInfo resolves it)."""
    from moshi.models import loaders

    try:
        name = default_name
        try:
            config = loaders.hf_get("config.json", repo, revision=revision)
            name = json.loads(Path(config).read_text()).get(config_key, default_name)
        except Exception as exn:  # noqa: BLE001 - legacy repos have no config.json
            logger.info("%s: no usable config.json (%s); using %s", repo, exn, default_name)
        return Path(loaders.hf_get(name, repo, revision=revision))
    except Exception as exn:  # noqa: BLE001 - hub errors come in many types; the user needs the repo
        raise FileNotFoundError(
            f"{repo}: could not fetch {default_name} from the hub ({type(exn).__name__}: {exn}); "
            "offline? pass a local path instead"
        ) from exn
