"""Token shards: writing, reading, tokenising audio, packing long sequences."""

from moshi_ttt.data.shards import (
    FRAME_RATE,
    NUM_STREAMS,
    ShardFormatError,
    ShardIndex,
    TokenShardWriter,
    resolve_shards,
    seconds_to_frames,
)
from moshi_ttt.data.stream import PAD_TOKEN, StreamPosition, TokenSequenceDataset, consumed_positions
from moshi_ttt.data.synthetic import write_synthetic_shards

__all__ = [
    "FRAME_RATE",
    "NUM_STREAMS",
    "PAD_TOKEN",
    "ShardFormatError",
    "ShardIndex",
    "StreamPosition",
    "TokenSequenceDataset",
    "TokenShardWriter",
    "consumed_positions",
    "resolve_shards",
    "seconds_to_frames",
    "write_synthetic_shards",
]
