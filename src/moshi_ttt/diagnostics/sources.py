"""The token sequences the long-stream checks run on: held-out shards, or structured random tokens."""

from __future__ import annotations

import numpy as np
import torch

from moshi_ttt.data.synthetic import synthetic_conversation
from moshi_ttt.eval.samples import load_codes


def synthetic_codes(model, frames: int, num_samples: int = 1, seed: int = 0) -> torch.Tensor:
    """``[N, 17, frames]`` structured random conversations in the model's vocabularies
    (``moshi_ttt.data.synthetic``: repeated phrases with noise, mostly-padding text)."""
    if frames < 1 or num_samples < 1:
        raise ValueError(f"frames and num_samples must be >= 1, got {frames}, {num_samples}")
    rng = np.random.default_rng(seed)
    convs = [synthetic_conversation(rng, frames, int(model.card), int(model.text_card),
                                    int(model.text_padding_token_id)) for _ in range(num_samples)]
    return torch.from_numpy(np.stack(convs).astype(np.int64))


def shard_codes(shards, frames: int, num_samples: int = 1, pack: bool = True, min_frames: int = 1) -> torch.Tensor:
    """``[N, 17, frames]`` from token shards (``moshi_ttt.eval.samples.load_codes``): consecutive
    conversations joined into ``frames``-long streams with ``pack``, else the first ones (padded)."""
    return load_codes(shards, frames, num_samples, min_frames, pack)

