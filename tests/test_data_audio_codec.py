"""Reading and validating stereo audio; the tiny Mimi and batched two-channel encoding."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from moshi_ttt.data.audio import AudioError, read_stereo
from moshi_ttt.data.codec import (
    CODEBOOKS_PER_CHANNEL,
    TINY_MIMI_CONFIG,
    StereoEncoder,
    build_tiny_mimi,
    load_mimi,
    save_mimi,
)


def speechy(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    """Two different channels: a gliding harmonic tone with pauses, and noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(np.sin(2 * np.pi * k * (150 + 60 * np.sin(2 * np.pi * 0.7 * t)) * t) / k for k in range(1, 4))
    tone *= np.sin(2 * np.pi * 1.3 * t) > -0.3
    noise = rng.normal(0, 0.2, t.size) * (np.sin(2 * np.pi * 0.9 * t + 1) > 0)
    return np.stack([0.3 * tone, noise]).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mimi():
    return build_tiny_mimi(seed=0)


def test_resampled_to_24k(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, speechy(2.0, 16_000).T, 16_000)
    audio = read_stereo(path)
    assert audio.sample_rate == 24_000 and audio.source_sample_rate == 16_000 and audio.resampled
    assert audio.samples.shape == (2, 48_000) and audio.samples.dtype == np.float32


@pytest.mark.parametrize(
    "case, reason",
    [
        ("mono", "mono_audio"),
        ("three", "wrong_channel_count"),
        ("nan", "nonfinite_samples"),
        ("inf", "nonfinite_samples"),
        ("short", "too_short"),
        ("empty", "empty_audio"),
        ("garbage", "unreadable_audio"),
        ("missing", "missing_audio"),
        ("truncated", "duration_mismatch"),
    ],
)
def test_bad_audio_is_refused_with_its_reason(tmp_path, case, reason):
    path = tmp_path / "a.wav"
    good = speechy(2.0)
    expected = None
    if case == "mono":
        sf.write(path, good[0], 24_000)
    elif case == "three":
        sf.write(path, np.concatenate([good, good[:1]]).T, 24_000)
    elif case in ("nan", "inf"):
        good[1, 100] = np.nan if case == "nan" else np.inf
        sf.write(path, good.T, 24_000, subtype="FLOAT")
    elif case == "short":
        sf.write(path, good[:, :1000].T, 24_000)
    elif case == "empty":
        sf.write(path, np.zeros((0, 2), np.float32), 24_000)
    elif case == "garbage":
        path.write_bytes(b"RIFF\x00\x00garbage" * 10)
    elif case == "truncated":
        sf.write(path, good.T, 24_000)
        expected = 10.0  # the manifest claims 10 s
    with pytest.raises(AudioError) as info:
        read_stereo(path, min_seconds=1.0, expected_seconds=expected)
    assert info.value.reason == reason and str(path) in str(info.value)


def test_tiny_mimi_gives_varied_codes_in_range(mimi):
    codes = StereoEncoder(mimi).encode([speechy(4.0)])[0]
    assert codes.shape == (2 * CODEBOOKS_PER_CHANNEL, 50) and codes.dtype == np.int16
    assert codes.min() >= 0 and codes.max() < TINY_MIMI_CONFIG["quantizer"]["bins"]
    for row in codes:  # every codebook of both channels uses several codes
        assert len(np.unique(row)) >= 3
    assert not np.array_equal(codes[:8], codes[8:])  # the channels are encoded separately


def test_batched_streaming_encoding_matches_one_shot(mimi):
    a, b = speechy(3.1, seed=1), speechy(1.7, seed=2)
    enc = StereoEncoder(mimi, chunk_seconds=0.4)
    ca, cb = enc.encode([a, b])
    assert ca.shape[1] == 39 and cb.shape[1] == 22  # ceil(samples / 1920)
    with torch.no_grad():
        direct = mimi.encode(torch.from_numpy(a)[:, None]).reshape(16, -1).numpy()
    np.testing.assert_array_equal(ca, direct)  # channel 0's codebooks first, then channel 1's
    np.testing.assert_array_equal(cb, enc.encode([b])[0])  # padding in a batch changes nothing


def test_tiny_mimi_is_deterministic_and_round_trips_through_safetensors(tmp_path, mimi):
    x = speechy(2.0)
    reference = StereoEncoder(mimi).encode([x])[0]
    np.testing.assert_array_equal(StereoEncoder(build_tiny_mimi(seed=0)).encode([x])[0], reference)
    assert not np.array_equal(StereoEncoder(build_tiny_mimi(seed=1)).encode([x])[0], reference)
    directory = save_mimi(mimi, TINY_MIMI_CONFIG, tmp_path / "mimi")
    for source in (directory, directory / "mimi.safetensors"):
        np.testing.assert_array_equal(
            StereoEncoder(load_mimi(source, device="cpu")).encode([x])[0], reference
        )


def test_unknown_mimi_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/at/all"):
        load_mimi(tmp_path / "nowhere/at/all", device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no mimi.safetensors"):
        load_mimi(empty, device="cpu")
