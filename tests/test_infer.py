"""Offline conversation: python -m moshi_ttt.infer MODEL --input user.wav --out DIR."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from moshi_ttt.serving.infer_cli import main
from serve_model import make_trained_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # streamed frames are tiny: one thread is fastest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import os

    from hydra import compose, initialize_config_dir

    root = tmp_path_factory.mktemp("infer")
    conf = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "conf"))

    def compose_cfg(*overrides):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose("train", overrides=[f"paths.output_root={root}", *overrides])

    return make_trained_run(compose_cfg, root)


def _tone(seconds: float, rate: int, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2 * t) > 0)
    return np.stack([left, 0.5 * left][:channels], axis=1).astype(np.float32)


def test_infer_writes_a_stereo_conversation_text_and_settings(run_dir, tmp_path):
    wav = tmp_path / "user.wav"
    sf.write(str(wav), _tone(3.0, 16000, 2), 16000)  # stereo at 16 kHz: mixed to mono, resampled
    out = tmp_path / "out"
    assert main([str(run_dir), "--input", str(wav), "--out", str(out), "--seed", "7", "--temp", "0.9",
                 "--top-k", "50", "--no-progress"]) == 0
    audio, rate = sf.read(str(out / "conversation.wav"), always_2d=True)
    assert rate == 24000 and audio.shape[1] == 2
    assert abs(audio.shape[0] - 3.0 * 24000) <= 1920
    moshi, user = audio[:, 0], audio[:, 1]
    assert np.abs(moshi).max() > 0.001  # Moshi said something
    expected_user = 0.75 * 0.3  # the mix of the two channels, at the tone's peak
    assert abs(np.abs(user).max() - expected_user) < 0.05
    text = json.loads((out / "text.json").read_text())
    times = [t["time_s"] for t in text["tokens"]]
    assert times == sorted(times) and all(0 <= t < 3.0 for t in times) and text["tokens"]
    assert all(w["start_s"] < w["end_s"] for w in text["words"])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seed"] == 7 and settings["lm_gen"]["temp"] == 0.9 and settings["lm_gen"]["top_k"] == 50
    assert settings["ttt"]["variant"] == "pre_attention" and settings["input"]["channels"] == 2
    assert settings["input"]["sample_rate"] == 16000 and settings["frames"] == 38

    again = tmp_path / "again"  # same seed, same conversation
    assert main([str(run_dir), "--input", str(wav), "--out", str(again), "--seed", "7", "--temp", "0.9",
                 "--top-k", "50", "--no-progress"]) == 0
    assert json.loads((again / "text.json").read_text()) == text


@pytest.mark.parametrize("content, message", [(None, "no audio samples"), (b"RIFF junk", "cannot read audio"),
                                              ("missing", "no such file")])
def test_infer_names_a_bad_input_file(run_dir, tmp_path, capsys, content, message):
    wav = tmp_path / "user.wav"
    if content is None:
        sf.write(str(wav), np.zeros((0, 1), np.float32), 24000)
    elif isinstance(content, bytes):
        wav.write_bytes(content)
    assert main([str(run_dir), "--input", str(wav), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(wav) in err and message in err
    assert not (tmp_path / "o").exists()


def test_a_channel_of_a_stereo_input_is_the_user(tmp_path):
    from moshi_ttt.serving.offline import read_user_audio

    wav = tmp_path / "stereo.wav"
    sf.write(str(wav), _tone(1.0, 24000, 2), 24000)
    mixed, info = read_user_audio(wav)
    right, _ = read_user_audio(wav, channel=1)
    assert abs(np.abs(mixed).max() - 0.75 * 0.3) < 0.01 and abs(np.abs(right).max() - 0.5 * 0.3) < 0.01
    assert info["channels"] == 2 and info["channel_used"] == "mix"
    with pytest.raises(ValueError, match="--channel 2 but the file has 2 channel"):
        read_user_audio(wav, channel=2)
