"""Token shards: writing, reading, tokenising audio, packing long sequences."""

from moshi_ttt.data.alignment import (
    END_OF_TEXT_PADDING_ID,
    MAIN_SPEAKER,
    TEXT_PADDING_ID,
    AlignmentError,
    Word,
    load_alignments,
    load_text_tokenizer,
    place_words,
)
from moshi_ttt.data.audio import AudioError, read_stereo
from moshi_ttt.data.codec import TINY_MIMI_CONFIG, StereoEncoder, build_tiny_mimi, load_mimi, save_mimi
from moshi_ttt.data.demo_dataset import build_demo_dataset
from moshi_ttt.data.prepare import PrepareResult, prepare
from moshi_ttt.data.recall import (
    TokenRecallSpec,
    build_audio_recall_set,
    delay_frames_for,
    write_token_recall_shards,
)
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
    "END_OF_TEXT_PADDING_ID",
    "MAIN_SPEAKER",
    "TEXT_PADDING_ID",
    "TINY_MIMI_CONFIG",
    "AlignmentError",
    "AudioError",
    "PrepareResult",
    "StereoEncoder",
    "TokenRecallSpec",
    "Word",
    "build_audio_recall_set",
    "build_demo_dataset",
    "build_tiny_mimi",
    "delay_frames_for",
    "load_alignments",
    "load_mimi",
    "load_text_tokenizer",
    "place_words",
    "prepare",
    "read_stereo",
    "save_mimi",
    "write_token_recall_shards",
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
