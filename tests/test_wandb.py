"""The offline W&B run: same id as the run name, config once, the metrics the docs promise."""

from __future__ import annotations

from moshi_ttt.training import train
from moshi_ttt.training.wandb_offline import find_offline_runs, read_offline_run


def test_offline_wandb_run_has_the_metrics(compose_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = train(compose_cfg("experiment=smoke", "logger=wandb", "run_name=wb", "curriculum=demo",
                                "curriculum.stages.0.steps=10", "curriculum.stages.1.steps=6",
                                "curriculum.stages.2.steps=4", "data.val_shards=null",
                                "callbacks.ttt_health.every_n_steps=1"))
    runs = find_offline_runs(summary["run_dir"])
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run["run_id"] == "wb"
    assert run["config"]["run_name"] == "wb" and "curriculum" in run["config"]
    assert run["config"]["params/trainable"] > 0
    keys = set().union(*run["history"])
    for key in ("train/loss", "train/text_loss", "train/audio_loss", "train/codebook_0_loss",
                "train/codebook_7_loss", "train/loss_0-1min", "train/grad_norm", "train/lr",
                "train/frames_per_s", "train/tokens_per_s", "curriculum/stage", "data/packed_fraction",
                "ttt/layer1/fast_weight_norm", "ttt/layer1/gate_mean_abs", "ttt/layer1/eta_mean"):
        assert key in keys, key
    stages = [row["curriculum/stage"] for row in run["history"] if "curriculum/stage" in row]
    assert stages[0] == 0 and stages[-1] == 2
