"""Export: checkpoint -> TTT weights + config -> the full model again, runnable in LMGen."""

from __future__ import annotations

import json

import torch
from moshi.models.lm import LMGen
from omegaconf import OmegaConf

from moshi_ttt.export import main as export_main
from moshi_ttt.models import build_model, load_exported
from moshi_ttt.training import train


def test_export_round_trip_and_lmgen(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", "run_name=exp", "trainer.max_steps=4", "data.val_shards=null",
                      "ttt=cache_replacement", "ttt.window=16", "ttt.layer.mini_batch_size=4")
    summary = train(cfg)
    ckpt = f"{summary['checkpoint_dir']}/last.ckpt"
    out = tmp_path / "export"
    assert export_main([ckpt, str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["ttt"]["variant"] == "cache_replacement" and meta["num_parameters"] == summary["param_counts"][
        "trainable"]

    model = load_exported(out)
    reference = build_model(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.ttt))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    codes = torch.randint(0, 64, (1, 17, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(codes).logits.nan_to_num(), reference(codes).logits.nan_to_num())
    gen = LMGen(model, use_sampling=False)
    with torch.no_grad(), gen.streaming(1):
        frames = [gen.step(codes[:, 9:, t : t + 1]) for t in range(6)]
    assert sum(f is not None for f in frames) >= 4


def test_export_errors_name_the_path(tmp_path):
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "o")]) == 2
