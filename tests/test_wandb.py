"""The offline W&B run: same id as the run name, config once, the metrics the docs promise."""

from __future__ import annotations

from moshi_ttt.training import train
from moshi_ttt.training.wandb_offline import find_offline_runs, read_offline_run


def test_offline_wandb_run_has_the_metrics(compose_cfg, monkeypatch, tmp_path):
    from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards

    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, delay, n in (("train", 40, 16), ("near", 20, 2), ("far", 60, 2)):
        write_token_recall_shards(tmp_path / name, n, TokenRecallSpec(delay_frames=delay, fact_start_jitter=10,
                                                                      tail_frames=5), seed=delay)
    summary = train(compose_cfg("experiment=smoke", "logger=wandb", "run_name=wb", "curriculum=demo",
                                "curriculum.stages.0.steps=10", "curriculum.stages.1.steps=6",
                                "curriculum.stages.2.steps=4", "data.val_batches=1",
                                "callbacks.ttt_health.every_n_steps=1",
                                "+data.sources.synthetic.shards=${data.train_shards}",
                                f"+data.sources.recall.shards={tmp_path / 'train'}",
                                "++curriculum.stages.0.sources={synthetic: 1.0}", "callbacks=[default,recall]",
                                f"callbacks.recall.shards=[{tmp_path / 'near'},{tmp_path / 'far'}]",
                                "callbacks.recall.window_frames=40"))
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
                "ttt/layer1/fast_weight_norm", "ttt/layer1/gate_mean_abs", "ttt/layer1/eta_mean",
                "data/synthetic/samples", "data/recall/samples", "val/recall_in_window", "val/recall_beyond_window",
                "val/recall_chance", "val/recall_seconds"):
        assert key in keys, key
    # recall by distance: a line plot of each validation, whose table W&B stores beside it
    tables = [row for row in run["history"] if "val/recall_by_distance_table/_type" in row]
    assert len(tables) == 3 and all(row["val/recall_by_distance_table/nrows"] == 2 for row in tables)
    samples = [row["data/recall/samples"] for row in run["history"] if "data/recall/samples" in row]
    assert samples[9] == 0 < samples[-1]  # the first stage reads the synthetic corpus only
    stages = [row["curriculum/stage"] for row in run["history"] if "curriculum/stage" in row]
    assert stages[0] == 0 and stages[-1] == 2
