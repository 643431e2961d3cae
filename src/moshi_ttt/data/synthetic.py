"""Structured random token conversations, so that training runs before any audio exists.

Each conversation repeats a few random "phrases" (short [17, L] token blocks) with noise, on
a text stream that is mostly padding: a model that attends to its context can lower its
loss, so curves move, and the structure spans the whole conversation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moshi_ttt.data.shards import NUM_STREAMS, ShardIndex, TokenShardWriter


def synthetic_conversation(
    rng: np.random.Generator,
    num_frames: int,
    card: int,
    text_card: int,
    text_padding_id: int = 3,
    num_phrases: int = 4,
    phrase_len: int = 12,
    noise: float = 0.1,
) -> np.ndarray:
    """One conversation, int16 ``[17, num_frames]``."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    phrases = rng.integers(0, card, size=(num_phrases, NUM_STREAMS, phrase_len))
    words = rng.integers(0, text_card, size=(num_phrases, phrase_len))
    words[:, 1::2] = text_padding_id  # text is mostly padding, as in Moshi's inner monologue
    out = np.empty((NUM_STREAMS, num_frames), dtype=np.int64)
    t = 0
    while t < num_frames:
        k = int(rng.integers(num_phrases))
        n = min(phrase_len, num_frames - t)
        out[1:, t : t + n] = phrases[k, 1:, :n]
        out[0, t : t + n] = words[k, :n]
        t += n
    flip = rng.random((NUM_STREAMS, num_frames)) < noise
    out[1:][flip[1:]] = rng.integers(0, card, size=int(flip[1:].sum()))
    return out.astype(np.int16)


def write_synthetic_shards(
    out_dir: str | Path,
    num_samples: int,
    num_frames: int | tuple[int, int],
    card: int,
    text_card: int,
    samples_per_shard: int = 16,
    seed: int = 0,
    text_padding_id: int = 3,
) -> ShardIndex:
    """Write ``num_samples`` conversations (fixed length, or uniform in a [min, max] range)."""
    if card > np.iinfo(np.int16).max or text_card > np.iinfo(np.int16).max:
        raise ValueError("int16 token shards need card and text_card below 32768")
    rng = np.random.default_rng(seed)
    lo, hi = (num_frames, num_frames) if isinstance(num_frames, int) else num_frames
    with TokenShardWriter(out_dir, prefix="synthetic", max_samples_per_shard=samples_per_shard) as writer:
        for i in range(num_samples):
            T = int(rng.integers(lo, hi + 1))
            codes = synthetic_conversation(rng, T, card, text_card, text_padding_id)
            writer.write(f"synthetic-{seed}-{i:07d}", codes, {"source": "synthetic", "frames": T, "seed": seed})
    return writer.index
