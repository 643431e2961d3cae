"""Recall while training: the recall callback scores a held-out recall set at every validation with the
evaluation's own code, splits it at the attention window, and logs it to the CSV, JSON and W&B."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import read_metric
from moshi_ttt.config.errors import ConfigError
from moshi_ttt.data import write_synthetic_shards
from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards
from moshi_ttt.eval.recall_callback import RecallCallback
from moshi_ttt.training import train


def recall_sets(root: Path) -> tuple[Path, Path]:
    """Two held-out token-level sets: facts 20 frames back (inside a 40-frame window) and 60 (beyond)."""
    for name, delay, seed in (("near", 20, 1), ("far", 60, 2)):
        write_token_recall_shards(root / name, 3, TokenRecallSpec(delay_frames=delay, fact_start_jitter=10,
                                                                  tail_frames=5), seed=seed)
    return root / "near", root / "far"


def test_recall_is_scored_at_every_validation_as_the_evaluation_scores_it(compose_cfg, tmp_path):
    near, far = recall_sets(tmp_path / "sets")
    summary = train(compose_cfg("experiment=smoke", "run_name=rc", "trainer.max_steps=8", "trainer.val_check_interval=4",
                                "callbacks=[default,recall]", f"callbacks.recall.shards=[{near},{far}]",
                                "callbacks.recall.window_frames=40", "callbacks.recall.batch_size=2"))
    run = Path(summary["run_dir"])
    inside, beyond = read_metric(run, "val/recall_in_window"), read_metric(run, "val/recall_beyond_window")
    assert sorted(inside) == sorted(beyond) == sorted(read_metric(run, "val/loss")) == [3, 7]
    assert all(v > 0 for v in read_metric(run, "val/recall_seconds").values())  # what the scoring took
    assert set(read_metric(run, "val/recall_chance").values()) == {1 / 64}
    reports = [json.loads(p.read_text()) for p in sorted((run / "recall").glob("step*.json"))]
    assert [r["step"] for r in reports] == [4, 8] and all(r["window_frames"] == 40 for r in reports)
    assert sorted(int(d) for d in reports[-1]["by_delay"]) == [20, 60] and reports[-1]["num_samples"] == 6
    # the last validation saw the final weights: the evaluation run on the trained model gives the same numbers
    from moshi_ttt.eval.models import load_model
    from moshi_ttt.eval.recall import recall_report, window_split

    split = window_split(recall_report(load_model("run", str(run)), [str(near), str(far)]), 40)
    assert math.isclose(split["in_window"], inside[7], abs_tol=1e-6)
    assert math.isclose(split["beyond_window"], beyond[7], abs_tol=1e-6)
    assert split["in_window_tokens"] == reports[-1]["in_window_tokens"] > 0


def test_without_a_window_every_fact_the_model_can_attend_to_is_inside(compose_cfg, tmp_path):
    near, far = recall_sets(tmp_path / "sets")
    summary = train(compose_cfg("experiment=smoke", "run_name=rc2", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "callbacks=[default,recall]", f"callbacks.recall.shards=[{near},{far}]"))
    report = json.loads(next((Path(summary["run_dir"]) / "recall").glob("step*.json")).read_text())
    assert report["window_frames"] == 3000  # the tiny Moshi's context
    assert report["beyond_window"] is None and report["in_window_tokens"] == report["tokens"] > 0
    assert math.isnan(read_metric(summary["run_dir"], "val/recall_beyond_window")[1])


def test_bad_recall_settings_are_named_before_compute(compose_cfg, tmp_path):
    write_synthetic_shards(tmp_path / "plain", num_samples=4, num_frames=40, card=64, text_card=64)
    near, _ = recall_sets(tmp_path / "sets")
    with pytest.raises(ConfigError, match=r"^callbacks.recall.shards='.*nope': shard\(s\) not found"):
        RecallCallback(str(tmp_path / "nope")).check()
    with pytest.raises(ConfigError, match=r"^callbacks.recall.shards='.*plain': holds no recall conversation"):
        RecallCallback(str(tmp_path / "plain")).check()
    with pytest.raises(ConfigError, match=r"^callbacks.recall.max_samples=0: a positive number"):
        RecallCallback(str(near), max_samples=0).check()
    with pytest.raises(ConfigError, match=r"^callbacks.recall.shards='.*nope'"):
        train(compose_cfg("experiment=smoke", "run_name=bad", "callbacks=[default,recall]",
                          f"callbacks.recall.shards={tmp_path / 'nope'}"))
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_the_planner_counts_the_recall_callback(tmp_path, capsys):
    """``python -m moshi_ttt.plan`` prints what the recall callback costs a GPU at each validation: linear in
    the conversations scored and their frames, from the set's own index when it exists."""
    from moshi_ttt.plan import Hardware, compose_config, main, prepare, recall_validation_cost

    recipe = ["experiment=moshiko_ttt_30min", "data.train_shards=/data/x"]
    inputs = prepare(compose_config(recipe))
    one, gib = recall_validation_cost(inputs, Hardware(8), 22_500, 8)
    assert recall_validation_cost(inputs, Hardware(8), 22_500, 16)[0] == pytest.approx(2 * one)
    assert recall_validation_cost(inputs, Hardware(8, mfu=0.7), 22_500, 8)[0] == pytest.approx(one / 2)
    assert recall_validation_cost(inputs, Hardware(8), 11_250, 8)[1] == pytest.approx(gib / 2)
    assert main([*recipe, "--gpus", "8", "--plain"]) == 0
    out = capsys.readouterr().out
    assert (f"recall callback: 8 conversation(s) x 22,500 frames scored at each of 3 validation(s): {one:.1f} s and "
            f"{gib:.1f} GiB") in out  # the set is not made yet: conversations as long as the longest stage
    near, far = recall_sets(tmp_path)
    assert main([*recipe, f"callbacks.recall.shards={near}", "--gpus", "8", "--plain"]) == 0
    frames = round(json.loads((near / "index.json").read_text())["total_frames"] / 3)
    assert f"recall callback: 3 conversation(s) x {frames:,} frames" in capsys.readouterr().out
    assert "recall callback" not in (main(["experiment=smoke", "--gpus", "1", "--plain"]), capsys.readouterr().out)[1]
