"""Audio where people listen: eval generate writes each generated conversation as a WAV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from serve_model import make_trained_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_eval_generate_writes_a_wav_next_to_its_report(tmp_path):
    from hydra import compose, initialize_config_dir

    from moshi_ttt.data.shards import TokenShardWriter
    from moshi_ttt.eval.__main__ import main

    conf = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "conf"))

    def compose_cfg(*overrides):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose("train", overrides=[f"paths.output_root={tmp_path}", *overrides])

    run = make_trained_run(compose_cfg, tmp_path)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (17, 40), generator=g)
    codes[0] = torch.randint(4, 200, (40,), generator=g)
    with TokenShardWriter(tmp_path / "shards", prefix="val") as w:
        w.write("conv0", codes.numpy().astype(np.int16))
    out = tmp_path / "eval"
    assert main(["generate", "--model", f"m={run}", "--shards", str(tmp_path / "shards"), "--frames", "30",
                 "--prompt-frames", "10", "--window-frames", "10", "--out", str(out), "--log-every", "0"]) == 0
    assert (out / "generation_m.json").exists()
    audio, rate = sf.read(str(out / "generation_m.wav"), always_2d=True)
    assert rate == 24000 and audio.shape == (30 * 1920, 2)
    assert np.abs(audio[:, 0]).max() > 0.001 and np.abs(audio[:, 1]).max() > 0.001  # Moshi and the user


@pytest.mark.slow  # a 4-step training run with W&B offline (~70 s on a loaded 2-core CPU)
def test_training_logs_an_audio_sample_to_wandb(compose_cfg, tmp_path):
    from moshi_ttt.data.demo_dataset import train_tokenizer
    from moshi_ttt.data.dialogue import corpus
    from moshi_ttt.training import train
    from moshi_ttt.training.wandb_offline import find_offline_runs

    tok = train_tokenizer(corpus(0, 400), tmp_path / "tok.model", 320)
    cfg = compose_cfg("experiment=smoke", "run_name=audio", "logger=wandb", "trainer.max_steps=4",
                      "trainer.val_check_interval=2", "callbacks=[default,audio_samples]",
                      "callbacks.audio_samples.mimi=tiny", f"callbacks.audio_samples.tokenizer={tok}",
                      "callbacks.audio_samples.every_n_steps=2", "callbacks.audio_samples.prompt_frames=6",
                      "callbacks.audio_samples.frames=16")
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    samples = sorted((run_dir / "audio_samples").glob("step*.wav"))
    assert [p.name for p in samples] == ["step00000002.wav", "step00000004.wav"]
    audio, rate = sf.read(str(samples[-1]), always_2d=True)
    assert rate == 24000 and audio.shape == (16 * 1920, 2) and np.abs(audio[:, 0]).max() > 0
    raw = b"".join(p.read_bytes() for p in find_offline_runs(run_dir))
    assert b"val/audio_sample" in raw and b"audio-file" in raw


def test_audio_samples_names_a_bad_codec_before_training(tmp_path):
    from moshi_ttt.eval.audio_samples import AudioSamplesCallback

    cb = AudioSamplesCallback(mimi=str(tmp_path / "no_mimi"), tokenizer=str(tmp_path / "t.model"))
    with pytest.raises(ValueError, match="callbacks.audio_samples.mimi"):
        cb.setup(None, None, "fit")
