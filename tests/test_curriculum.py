"""The progressive curriculum: reaches its last stage and switches lengths. Resume inside and
between stages: tests/test_resume_kill.py."""

from __future__ import annotations

import pytest

from helpers import read_metric
from moshi_ttt.training import train
from moshi_ttt.training.curriculum import Curriculum

# The demo curriculum's three stages with fewer steps (6 / 4 / 4) and shorter sequences.
DEMO = ("experiment=smoke", "curriculum=demo", "data.val_shards=null", "callbacks.model_checkpoint.every_n_train_steps=5",
        "curriculum.stages.0.steps=6", "curriculum.stages.1.steps=4", "curriculum.stages.2.steps=4",
        "curriculum.stages.1.seconds=5.12", "curriculum.stages.2.seconds=10.24")


def test_stage_arithmetic_and_validation():
    cur = Curriculum.from_config({"stages": [
        {"name": "a", "seconds": 15, "steps": 10, "warmup_steps": 2},
        {"name": "b", "seconds": 300, "steps": 5, "lr": 5e-4},
    ]})
    assert [s.frames for s in cur.stages] == [188, 3750]
    assert cur.total_steps == 15
    assert cur.locate(0) == (0, 0) and cur.locate(9) == (0, 9) and cur.locate(10) == (1, 0)
    assert cur.lr_multiplier(0, base_lr=1e-3) == pytest.approx(0.5)  # warmup 1/2
    assert cur.lr_multiplier(10, base_lr=1e-3) == pytest.approx(0.5)  # stage b peaks at 5e-4
    with pytest.raises(ValueError, match=r"curriculum.stages.1.steps"):
        Curriculum.from_config({"stages": [{"name": "a", "seconds": 1, "steps": 1},
                                           {"name": "b", "seconds": 1, "steps": 0}]})
    with pytest.raises(ValueError, match=r"curriculum.stages.0: unknown key"):
        Curriculum.from_config({"stages": [{"name": "a", "seconds": 1, "steps": 1, "stepz": 3}]})


def test_demo_curriculum_reaches_its_last_stage(compose_cfg):
    summary = train(compose_cfg(*DEMO, "run_name=cur"))
    assert summary["global_step"] == 14
    stage = read_metric(summary["run_dir"], "curriculum/stage")
    assert [stage[s] for s in (0, 5, 6, 9, 10, 13)] == [0, 0, 1, 1, 2, 2]
    ckpts = {p.name for p in (summary["run_dir"] and __import__("pathlib").Path(summary["checkpoint_dir"])).iterdir()}
    assert {"stage0-short-end.ckpt", "stage1-medium-end.ckpt", "stage2-long-end.ckpt"} <= ckpts
