"""Reading two-channel conversations from disk, refusing the ones Mimi must not see.

Audio goes through soundfile only (torchaudio's load/save need torchcodec and FFmpeg, which
this project does not ship); resampling uses ``torchaudio.functional.resample``. Every
refusal is an :class:`AudioError` with a short machine-readable ``reason`` so that the
preparation report can count skipped inputs by cause.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 24_000  # Mimi's sample rate
AUDIO_EXTENSIONS = (".wav", ".flac")


class AudioError(ValueError):
    """An input file that cannot become a conversation; ``reason`` is the report's category."""

    def __init__(self, reason: str, path: str | Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = str(path)
        self.detail = detail


@dataclass
class StereoAudio:
    samples: np.ndarray  # float32 [2, S] at ``sample_rate``: channel 0 Moshi, channel 1 the user
    sample_rate: int
    source_sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.sample_rate

    @property
    def resampled(self) -> bool:
        return self.source_sample_rate != self.sample_rate


def resample(samples: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample ``[C, S]`` float32 audio; a no-op when the rates already match."""
    if source_rate == target_rate:
        return samples
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples)), int(source_rate), int(target_rate))
    return out.numpy().astype(np.float32, copy=False)


def read_stereo(
    path: str | Path,
    min_seconds: float = 1.0,
    expected_seconds: float | None = None,
    duration_tolerance: float | None = 1.0,
    target_rate: int = SAMPLE_RATE,
) -> StereoAudio:
    """Load a stereo conversation, validated and resampled to ``target_rate``.

    ``expected_seconds`` (a manifest's ``duration``) catches truncated files: a file shorter
    or longer than announced by more than ``duration_tolerance`` seconds is refused.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError("missing_audio", path, "audio file not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exn:  # noqa: BLE001 - corrupt headers and truncated data raise several types
        raise AudioError("unreadable_audio", path, f"cannot decode audio ({exn})") from exn
    channels = data.shape[1]
    if channels == 1:
        raise AudioError("mono_audio", path, "mono file: a conversation needs 2 channels (Moshi, user)")
    if channels != 2:
        raise AudioError("wrong_channel_count", path, f"{channels} channels, expected 2 (Moshi, user)")
    if data.shape[0] == 0:
        raise AudioError("empty_audio", path, "no samples")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError("nonfinite_samples", path, f"{bad} NaN/Inf samples")
    seconds = data.shape[0] / rate
    if expected_seconds is not None and duration_tolerance is not None:
        if abs(seconds - float(expected_seconds)) > duration_tolerance:
            raise AudioError(
                "duration_mismatch",
                path,
                f"{seconds:.2f} s of audio, the manifest says {float(expected_seconds):.2f} s (truncated?)",
            )
    if seconds < min_seconds:
        raise AudioError("too_short", path, f"{seconds:.2f} s < min_seconds={min_seconds}")
    samples = resample(np.ascontiguousarray(data.T), int(rate), target_rate)
    return StereoAudio(samples=samples, sample_rate=target_rate, source_sample_rate=int(rate))


def write_stereo(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``[2, S]`` float audio as 16-bit PCM (wav or flac by extension)."""
    if samples.ndim != 2 or samples.shape[0] != 2:
        raise ValueError(f"{path}: expected [2, S] audio, got shape {samples.shape}")
    sf.write(str(path), np.clip(samples.T, -1.0, 1.0), sample_rate, subtype="PCM_16")
