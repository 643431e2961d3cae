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
from moshi_ttt.data.stream import (
    PAD_TOKEN,
    MixedSequenceDataset,
    StreamPosition,
    TokenSequenceDataset,
    consumed_positions,
)
from moshi_ttt.data.synthetic import write_synthetic_shards

# The preparation pipeline is imported on first use: its modules are also run with
# `python -m` (prepare, demo_dataset, recall), which must not find them imported already.
_LAZY = {
    "END_OF_TEXT_PADDING_ID": "alignment", "MAIN_SPEAKER": "alignment", "TEXT_PADDING_ID": "alignment",
    "AlignmentError": "alignment", "Word": "alignment", "load_alignments": "alignment",
    "load_text_tokenizer": "alignment", "place_words": "alignment",
    "AudioError": "audio", "read_stereo": "audio",
    "TINY_MIMI_CONFIG": "codec", "StereoEncoder": "codec", "build_tiny_mimi": "codec", "load_mimi": "codec",
    "save_mimi": "codec",
    "build_demo_dataset": "demo_dataset",
    "PrepareResult": "prepare", "prepare": "prepare",
    "TokenRecallSpec": "recall", "build_audio_recall_set": "recall", "delay_frames_for": "recall",
    "write_token_recall_shards": "recall",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"moshi_ttt.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moshi_ttt.data' has no attribute {name!r}")


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
    "MixedSequenceDataset",
    "TokenSequenceDataset",
    "TokenShardWriter",
    "consumed_positions",
    "resolve_shards",
    "seconds_to_frames",
    "write_synthetic_shards",
]
