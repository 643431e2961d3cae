"""Audio where people listen: eval generate writes each generated conversation as a WAV."""

from __future__ import annotations

import os

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
