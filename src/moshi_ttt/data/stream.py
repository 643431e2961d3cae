"""Deterministic, resumable streams of fixed-length token sequences read from shards.

Every (rank, dataloader worker) pair reads its own *stream*. A stream walks an infinite,
seeded sequence of shards (an epoch-wise permutation split across streams, or shards drawn
with replacement when ``resampled``), shuffles inside each shard with a bounded buffer, and
crops or pads each conversation to the sequence length. Because a stream is a pure function
of the seed and its id, its position is two integers (shard number in the stream, samples
already emitted from that shard): that is what checkpoints store, and resuming re-reads at
most one shard. Bad samples and unreadable shards are skipped and counted, never fatal.

Several sources (``data.sources``: a corpus, spoken recall conversations, ...) are mixed by
webdataset's own ``RandomMix``: each source is such a stream, cropped/padded/packed on its
own, and every draw picks the source of the next sequence with the weights' probabilities
(``MixedSequenceDataset``). A draw's randomness is seeded by (seed, stream, draw number), so
the mixture's position is the draw count plus each source's two integers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from moshi_ttt.data.shards import (
    NUM_STREAMS,
    ShardFormatError,
    decode_codes,
    index_checksums,
    iter_shard_samples,
    resolve_shards,
    sha256_file,
)

logger = logging.getLogger(__name__)

PAD_TOKEN = -1  # moshi's zero_token_id: no input embedding, excluded from the loss masks


def _stable_seed(parts: tuple) -> int:
    """A seed that is the same in every process (``hash()`` of strings is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _rng(parts: tuple) -> random.Random:
    return random.Random(_stable_seed(parts))


def stream_identity(rank: int, world_size: int, worker_rotation: int = 0) -> tuple[int, int]:
    """(this reader's stream id, number of streams): one stream per (rank, dataloader worker).

    Rotation makes a resumed run hand out the next batch from the same stream as the
    uninterrupted run would (DataLoader always starts at worker 0)."""
    info = get_worker_info()
    num_workers = 1 if info is None else info.num_workers
    worker = 0 if info is None else info.id
    local = (worker + worker_rotation) % num_workers
    return rank * num_workers + local, world_size * num_workers


@dataclass(frozen=True)
class StreamPosition:
    shard_seq: int = 0  # index into this stream's infinite shard sequence
    emitted: int = 0  # samples already emitted from that shard


class _SkipCounter:
    """Counts what a stream had to skip; webdataset calls it as its error handler."""

    def __init__(self, stream_id: int):
        self.stream_id = stream_id
        self.count = 0
        self.negative_ids = 0  # samples whose negative ids (other than the padding value) became padding

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        logger.warning("stream %d: skipped unreadable data: %s", self.stream_id, exn)
        return True


def check_token_range(codes: np.ndarray, card: int | None, text_card: int | None) -> int:
    """Refuse ids the model has no embedding for; return how many other negative ids there are.

    Row 0 is text (``[0, text_card)``), rows 1.. are audio (``[0, card)``); -1 is padding.
    Out-of-vocabulary ids would otherwise stop the run deep inside moshi's embedding.
    """
    for rows, limit, what in ((codes[:1], text_card, "text_card"), (codes[1:], card, "card")):
        if limit is not None and rows.size and int(rows.max()) >= limit:
            bad = np.argwhere(rows >= limit)[0]
            raise ShardFormatError(f"token id {int(rows.max())} >= {what}={limit} (stream {int(bad[0]) + (0 if what == 'text_card' else 1)}, "
                                   f"frame {int(bad[1])})")
    return int(((codes < 0) & (codes != PAD_TOKEN)).sum())


class TokenSequenceDataset(IterableDataset):
    """Fixed-length ``[17, seq_len]`` sequences from token shards, split by rank and worker.

    Each item is a dict: ``codes`` (int64, padded with -1), ``key`` (the sample's key), ``stream``/``shard_seq``/``emitted``
    (its position, so the trainer can checkpoint exactly what it consumed) and ``skipped``
    (cumulative bad samples in this stream) and ``segments`` (``[seq_len]``, which packed
    conversation each frame belongs to: all zeros unless ``packing`` joined short conversations).
    """

    def __init__(
        self,
        shards,
        seq_len: int,
        seed: int | tuple = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        shuffle_buffer: int = 64,
        random_crop: bool = True,
        min_frames: int = 1,
        positions: dict[int, StreamPosition] | None = None,
        worker_rotation: int = 0,
        packing: bool = False,
        reset_at_boundaries: bool = True,
        card: int | None = None,
        text_card: int | None = None,
        verify_checksums: bool = True,
    ):
        super().__init__()
        if seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive, got {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.urls = resolve_shards(shards)
        self.source = str(shards) if isinstance(shards, (str, os.PathLike)) else os.path.commonpath(self.urls or ["."])
        self.card, self.text_card = card, text_card
        # sha256 recorded in index.json, checked the first time this process opens each shard
        self.checksums = index_checksums(shards) if verify_checksums else {}
        self._verified: dict[str, bool] = {}
        self.seq_len = int(seq_len)
        self.seed = seed if isinstance(seed, tuple) else int(seed)  # a tuple: (run seed, source name)
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.random_crop = random_crop
        self.min_frames = max(1, int(min_frames))
        self.positions = dict(positions or {})
        self.worker_rotation = worker_rotation
        self.packing = packing
        self.reset_at_boundaries = reset_at_boundaries

    def check_streams(self, num_workers: int) -> None:
        """Fail before training when shards cannot be split over every stream."""
        streams = self.world_size * max(1, num_workers)
        if not self.resampled and len(self.urls) < streams:
            raise ValueError(
                f"{len(self.urls)} shard(s) cannot be split over {self.world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) = {streams} streams without repeats: write more shards, "
                "lower data.num_workers, or set data.resampled=true"
            )

    # ---- stream identity -------------------------------------------------------------
    def _stream_id(self) -> tuple[int, int]:
        return stream_identity(self.rank, self.world_size, self.worker_rotation)

    def _shard_for(self, stream: int, num_streams: int, shard_seq: int) -> str:
        if self.resampled:
            rng = _rng((self.seed, "resample", stream, shard_seq))
            return self.urls[rng.randrange(len(self.urls))]
        per_epoch = len(self.urls) // num_streams
        if per_epoch == 0:
            raise ValueError(f"{len(self.urls)} shard(s) for {num_streams} streams; set data.resampled=true")
        epoch, i = divmod(shard_seq, per_epoch)
        order = list(range(len(self.urls)))
        _rng((self.seed, "epoch", epoch)).shuffle(order)
        return self.urls[order[stream + i * num_streams]]

    # ---- samples ---------------------------------------------------------------------
    def _to_sequence(self, codes: np.ndarray, rng: random.Random) -> np.ndarray:
        T = codes.shape[1]
        if T > self.seq_len:
            start = rng.randrange(T - self.seq_len + 1) if self.random_crop else 0
            return codes[:, start : start + self.seq_len]
        out = np.full((NUM_STREAMS, self.seq_len), PAD_TOKEN, dtype=np.int16)
        out[:, :T] = codes
        return out

    def _shard_samples(self, url: str, stream: int, shard_seq: int,
                       skips: _SkipCounter) -> Iterator[tuple[str, np.ndarray]]:
        rng = _rng((self.seed, "shuffle", stream, shard_seq))
        buffer: list[tuple[str, np.ndarray]] = []
        if not self._checksum_ok(url, skips):
            return
        for raw in iter_shard_samples(url, skips):
            try:
                codes = decode_codes(raw["codes.npy"])
                if "meta.json" in raw:
                    json.loads(raw["meta.json"])
                if codes.shape[1] < self.min_frames:
                    raise ValueError(f"{codes.shape[1]} frames < data.min_frames={self.min_frames}")
                negative = check_token_range(codes, self.card, self.text_card)
            except Exception as exn:  # noqa: BLE001 - any bad sample is skipped and counted
                skips(ValueError(f"{url}: sample {raw.get('__key__')!r}: {exn}"))
                continue
            if negative:
                skips.negative_ids += 1
                logger.warning("stream %d: %s: sample %r has %d negative token id(s) other than the padding "
                               "value %d: read as padding", stream, url, raw.get("__key__"), negative, PAD_TOKEN)
                codes = np.where(codes < 0, PAD_TOKEN, codes).astype(codes.dtype)
            buffer.append((str(raw.get("__key__")), codes))
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _checksum_ok(self, url: str, skips: _SkipCounter) -> bool:
        expected = self.checksums.get(url)
        if expected is None:
            return True
        if url not in self._verified:
            got = sha256_file(url)
            self._verified[url] = got == expected
            if got != expected:
                skips(ShardFormatError(f"{url}: sha256 {got[:12]}... does not match {expected[:12]}... in index.json "
                                       "(changed or damaged since it was written): shard skipped"))
        elif not self._verified[url]:
            skips.count += 1  # the same damaged shard drawn again: counted, warned once
        return self._verified[url]

    def _conversations(self, stream: int, num_streams: int, skips: _SkipCounter):
        """(key, codes, shard_seq, emitted) in stream order, from the resume position on."""
        pos = self.positions.get(stream, StreamPosition())
        shard_seq, to_skip = pos.shard_seq, pos.emitted
        empty_in_a_row = 0
        while True:
            url = self._shard_for(stream, num_streams, shard_seq)
            emitted = 0
            for key, codes in self._shard_samples(url, stream, shard_seq, skips):
                emitted += 1
                if emitted > to_skip:
                    yield key, codes, shard_seq, emitted
            to_skip = 0
            empty_in_a_row = empty_in_a_row + 1 if emitted == 0 else 0
            if empty_in_a_row > 2 * len(self.urls) + 10:
                raise RuntimeError(f"stream {stream}: no readable sample in {empty_in_a_row} consecutive shards of "
                                   f"{self.source} (see the warnings above for why each was skipped)")
            shard_seq += 1

    def __iter__(self) -> Iterator[dict]:
        return self.sequences(*self._stream_id())

    def sequences(self, stream: int, num_streams: int) -> Iterator[dict]:
        """Stream ``stream``'s sequences from its resume position on (what ``__iter__`` yields)."""
        skips = _SkipCounter(stream)
        conversations = self._conversations(stream, num_streams, skips)
        for key, codes, shard_seq, emitted in conversations:
            crop_rng = _rng((self.seed, "crop", stream, shard_seq, emitted))
            segments = np.zeros(self.seq_len, dtype=np.int64)
            keys = [key]
            if self.packing and codes.shape[1] < self.seq_len:
                # Pack the following conversations behind this one; the last is cut at seq_len.
                parts, total = [codes], codes.shape[1]
                while total < self.seq_len:
                    key2, codes2, shard_seq, emitted = next(conversations)
                    piece = codes2[:, : self.seq_len - total]
                    segments[total : total + piece.shape[1]] = len(parts)
                    parts.append(piece)
                    keys.append(key2)
                    total += piece.shape[1]
                seq = np.concatenate(parts, axis=1)
            else:
                seq = self._to_sequence(codes, crop_rng)
            yield {
                "codes": torch.from_numpy(seq.astype(np.int64)),
                "segments": torch.from_numpy(segments),
                "key": "+".join(keys),
                "stream": stream,
                "shard_seq": shard_seq,
                "emitted": emitted,
                "skipped": skips.count,
                "negative_ids": skips.negative_ids,
                "reset_at_boundaries": self.reset_at_boundaries,
            }


class MixedSequenceDataset(IterableDataset):
    """Sequences of several sources, mixed by webdataset's ``RandomMix`` with ``weights``.

    Each source is a :class:`TokenSequenceDataset` (its own shards, positions and seed); in a
    reader's stream they all read the same stream id, so a (rank, worker) pair owns one stream
    of every source. Each draw picks the source of the next *sequence* (after that source's own
    crop, padding or packing), so a weight is the share of the stage's sequences, and of its
    compute, that the source gets. ``RandomMix`` draws with Python's global ``random``; every
    draw runs with it seeded by (seed, stream, draw number) and restored afterwards, so the
    choice of draw ``n`` depends on nothing else and a stream resumed at ``draws[stream]`` makes
    the same choices as one that never stopped. Items are those of the sources plus ``source``
    (the index given in ``source_ids``) and ``draw`` (draws made in this stream, this one included).
    """

    def __init__(self, sources: list[TokenSequenceDataset], weights: list[float], source_ids: list[int],
                 seed: int = 0, draws: dict[int, int] | None = None):
        super().__init__()
        if not sources or len(sources) != len(weights) or len(sources) != len(source_ids):
            raise ValueError(f"need one weight and one id per source, got {len(sources)} source(s), "
                             f"{len(weights)} weight(s), {len(source_ids)} id(s)")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"source weights must be positive, got {weights}")
        first = sources[0]
        if any((s.rank, s.world_size, s.worker_rotation) != (first.rank, first.world_size, first.worker_rotation)
               for s in sources):
            raise ValueError("every source of a mixture must be read by the same rank and worker rotation")
        self.sources, self.weights, self.source_ids = list(sources), [float(w) for w in weights], list(source_ids)
        self.seed = int(seed)
        self.draws = dict(draws or {})

    def check_streams(self, num_workers: int) -> None:
        for source in self.sources:
            source.check_streams(num_workers)

    def __iter__(self) -> Iterator[dict]:
        first = self.sources[0]
        stream, num_streams = stream_identity(first.rank, first.world_size, first.worker_rotation)
        tagged = [_tag(source.sequences(stream, num_streams), sid) for source, sid in zip(self.sources, self.source_ids)]
        mixed = iter(wds.RandomMix(tagged, probs=self.weights))
        draw = self.draws.get(stream, 0)
        while True:
            saved = random.getstate()
            random.seed(_stable_seed((self.seed, "mix", stream, draw)))
            try:
                item = next(mixed)
            except StopIteration:  # a source ran dry (they are endless unless broken)
                return
            finally:
                random.setstate(saved)
            draw += 1
            item["draw"] = draw
            yield item


def _tag(items: Iterator[dict], source_id: int) -> Iterator[dict]:
    for item in items:
        item["source"] = source_id
        yield item


def consumed_positions(batch: dict) -> tuple[dict[tuple[int, int], StreamPosition], dict[int, int]]:
    """What resuming must skip after a collated batch: the furthest position per (stream, source)
    and the draws made per stream (``source`` is 0 and no draw is counted for an unmixed stream)."""
    sources = batch["source"].tolist() if "source" in batch else [0] * len(batch["stream"])
    positions: dict[tuple[int, int], StreamPosition] = {}
    for s, src, n, e in zip(batch["stream"].tolist(), sources, batch["shard_seq"].tolist(), batch["emitted"].tolist()):
        cur = positions.get((s, src))
        if cur is None or (n, e) > (cur.shard_seq, cur.emitted):
            positions[(s, src)] = StreamPosition(n, e)
    draws: dict[int, int] = {}
    if "draw" in batch:
        for s, d in zip(batch["stream"].tolist(), batch["draw"].tolist()):
            draws[s] = max(draws.get(s, 0), int(d))
    return positions, draws
