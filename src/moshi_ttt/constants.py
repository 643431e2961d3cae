"""Numbers fixed by Moshi itself, defined once for the whole package."""

import math

#: Mimi codec frames (= temporal-transformer steps) per second of audio: 15 s = 188 frames,
#: 1 min = 750, 30 min = 22 500. Equal to ``moshi.models.loaders.FRAME_RATE`` (tested); kept here so
#: data and CLI modules need not import moshi to count frames.
FRAME_RATE = 12.5


def seconds_to_frames(seconds: float) -> int:
    """Frames at Mimi's 12.5 Hz, rounded up so that a stage never gets less than asked."""
    return math.ceil(seconds * FRAME_RATE - 1e-9)
