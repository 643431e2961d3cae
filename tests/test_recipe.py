"""The recipe a user submits for the real model runs here first: conf/experiment/moshiko_ttt_30min
in miniature (tests/recipe_miniature.py lists the only overrides), through all three curriculum
stages with packing, memory resets and gradient checkpointing, under DeepSpeed on 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_metric
from recipe_miniature import STAGE_SHAPES, miniature_overrides, stage_of_step, total_steps
from serve_model import make_dataset_dir

REPO = Path(__file__).resolve().parents[1]


def test_recipe_composes_with_the_real_model_settings(compose_cfg):
    cfg = compose_cfg("experiment=moshiko_ttt_30min", "data.train_shards=/data/shards")
    assert cfg.model.repo == "kyutai/moshiko-pytorch-bf16" and cfg.model.gradient_checkpointing
    assert [s.seconds for s in cfg.curriculum.stages] == [15, 300, 1800]
    assert [bool(s.packing) for s in cfg.curriculum.stages] == [False, True, True]
    assert "DeepSpeed" in cfg.trainer.strategy._target_
    # the memory the proof shows opening: hybrid spread over the depth, taught by the frozen Moshi at its own window
    assert cfg.ttt.variant == "hybrid" and list(cfg.ttt.layer_indices) == [0, 16, 31]
    assert cfg.loss.distill.weight == 1 and cfg.loss.distill.teacher_window is None
    assert "wandb" in cfg.logger
    assert cfg.callbacks.audio_samples.mimi == "kyutai/moshiko-pytorch-bf16"
    # the long stages mix in spoken recall conversations; recall is scored at every validation
    assert [dict(s.sources) for s in cfg.curriculum.stages] == [
        {"conversations": 1.0}, {"conversations": 0.85, "recall_5min": 0.15}, {"conversations": 0.75, "recall_30min": 0.25}]
    assert cfg.data.sources.conversations.shards == "/data/shards" and "recall" in cfg.callbacks


@pytest.mark.slow
def test_recipe_in_miniature_runs_every_stage_under_deepspeed(tmp_path):
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(tmp_path), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}
    codec = make_dataset_dir(tmp_path / "codec")
    cmd = [sys.executable, "train.py", "experiment=moshiko_ttt_30min", "run_name=mini", *miniature_overrides(codec)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    run = tmp_path / "runs" / "mini"
    losses = read_metric(run, "train/loss")
    assert sorted(losses) == list(range(total_steps())), sorted(losses)
    # the recipe's teacher (the frozen base at its own window) taught every step, beside Moshi's loss
    assert sorted(read_metric(run, "train/distill_loss")) == list(range(total_steps()))
    packed = read_metric(run, "data/packed_fraction")
    for stage in (1, 2):  # the long stages join conversations (and reset TTT memory between them)
        assert any(v > 0 for s, v in packed.items() if stage_of_step(s) == stage), packed
    # each stage draws its own mixture: the corpus throughout, the 5- and 30-minute recall sets in their stages
    samples = {name: read_metric(run, f"data/{name}/samples") for name in ("conversations", "recall_5min", "recall_30min")}
    grew = {name: {stage_of_step(s) for s, v in counts.items() if v > counts.get(s - 1, 0)} for name, counts in samples.items()}
    assert grew["conversations"] == {0, 1, 2} and grew["recall_5min"] <= {1} and grew["recall_30min"] <= {2}, samples
    last = {name: counts[total_steps() - 1] for name, counts in samples.items()}
    assert last["recall_5min"] + last["recall_30min"] > 0, samples
    assert sum(last.values()) == 2 * sum(steps * batch for _, steps, batch in STAGE_SHAPES)  # both ranks' sequences
    # DeepSpeed's own gradient norm, at every optimizer step (p.grad is None under ZeRO)
    assert sorted(read_metric(run, "train/grad_norm")) == list(range(total_steps()))
    # recall at each validation, a fact inside the window and one beyond it
    inside, beyond = read_metric(run, "val/recall_in_window"), read_metric(run, "val/recall_beyond_window")
    assert sorted(inside) == sorted(beyond) == sorted(read_metric(run, "val/loss")) and inside
    ckpts = run / "checkpoints"
    for i, name in enumerate(["15s", "5min", "30min"]):
        assert (ckpts / f"stage{i}-{name}-end.ckpt").exists(), sorted(p.name for p in ckpts.iterdir())
    assert read_metric(run, "val/loss"), "validation never ran"
    assert list(run.glob("wandb/offline-run-*")), "no offline W&B run"
    assert list((run / "audio_samples").glob("step*.wav")), "the recipe's audio samples were not written"
    assert len(STAGE_SHAPES) == 3
