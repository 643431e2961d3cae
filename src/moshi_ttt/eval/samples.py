"""Held-out conversations from token shards, in shard order, as tensors for teacher-forced evaluation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from moshi_ttt.data.shards import NUM_STREAMS, decode_codes, iter_shard_samples, resolve_shards

logger = logging.getLogger(__name__)
PAD = -1  # moshi's zero_token_id: no input embedding, excluded from every loss/accuracy mask


@dataclass
class Sample:
    key: str
    codes: torch.Tensor  # int64 [17, T]
    meta: dict = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])


class SkipCounter:
    """Bad samples are skipped and counted (with the shard and key in the log), never fatal."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        logger.warning("skipping a bad sample: %s", exn)
        return True


def iter_samples(shards, max_samples: int | None = None, min_frames: int = 1,
                 skips: SkipCounter | None = None) -> Iterator[Sample]:
    """Conversations of ``shards`` (a directory, glob, brace pattern or list) in shard order."""
    skips = skips if skips is not None else SkipCounter()
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None), got {max_samples}")
    n = 0
    for url in resolve_shards(shards):
        for raw in iter_shard_samples(url, skips):
            key = str(raw.get("__key__"))
            try:
                codes = decode_codes(raw["codes.npy"])
                meta = json.loads(raw["meta.json"]) if "meta.json" in raw else {}
            except Exception as exn:  # noqa: BLE001 - any bad sample is skipped and counted
                skips(ValueError(f"{url}: sample {key!r}: {exn}"))
                continue
            if codes.shape[1] < min_frames:
                continue
            yield Sample(key, torch.from_numpy(codes.astype(np.int64)), meta)
            n += 1
            if max_samples is not None and n >= max_samples:
                return


def stack_codes(codes: Iterable[torch.Tensor], frames: int | None = None) -> torch.Tensor:
    """``[N, 17, frames]`` int64: each conversation cut to ``frames`` (default: the longest) and
    right-padded with -1 (masked out of every metric)."""
    codes = list(codes)
    if not codes:
        raise ValueError("no conversations to stack")
    T = frames if frames is not None else max(c.shape[-1] for c in codes)
    out = torch.full((len(codes), NUM_STREAMS, T), PAD, dtype=torch.long)
    for i, c in enumerate(codes):
        if c.dim() != 2 or c.shape[0] != NUM_STREAMS:
            raise ValueError(f"conversation {i} has shape {tuple(c.shape)}, expected [{NUM_STREAMS}, T]")
        n = min(T, c.shape[1])
        out[i, :, :n] = c[:, :n]
    return out


def load_codes(shards, frames: int, num_samples: int, min_frames: int = 1, pack: bool = False) -> torch.Tensor:
    """``num_samples`` held-out sequences of ``frames`` frames as ``[N, 17, frames]``: the first
    conversations of ``shards`` (shorter ones padded with -1), or with ``pack`` consecutive
    conversations joined end to end until each sequence is full (long streams from short
    conversations; a sequence left unfilled when the shards run out is padded)."""
    if frames < 1 or num_samples < 1:
        raise ValueError(f"frames and num_samples must be >= 1, got {frames}, {num_samples}")
    if not pack:
        samples = [s.codes for s in iter_samples(shards, num_samples, min_frames)]
    else:
        samples, parts, total = [], [], 0
        for s in iter_samples(shards, None, min_frames):
            parts.append(s.codes[:, : frames - total])
            total += parts[-1].shape[1]
            if total == frames:
                samples.append(torch.cat(parts, dim=1))
                parts, total = [], 0
                if len(samples) == num_samples:
                    break
        if parts and len(samples) < num_samples:
            samples.append(torch.cat(parts, dim=1))
    if not samples:
        raise ValueError(f"{shards}: no conversation with at least {min_frames} frames")
    return stack_codes(samples, frames)


def batched(items: Iterable, batch_size: int) -> Iterator[list]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_vocabulary(codes: torch.Tensor, model, source: str) -> None:
    """A clear error when the tokens do not fit the model (before any compute)."""
    streams = getattr(model, "num_codebooks", codes.shape[1] if codes.dim() == 3 else None)
    if codes.dim() != 3 or codes.shape[1] != streams:
        raise ValueError(f"{source}: codes of shape {tuple(codes.shape)}, the model needs [N, {streams}, T]")
    text, audio = codes[:, 0], codes[:, 1:]
    if int(text.max()) >= model.text_card:
        raise ValueError(f"{source}: text token {int(text.max())} >= the model's text_card {model.text_card}")
    if int(audio.max()) >= model.card:
        raise ValueError(f"{source}: audio token {int(audio.max())} >= the model's card {model.card}")
