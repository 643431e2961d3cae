"""End-to-end training through the Hydra config: trains, resumes exactly, fails early on bad input."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

from helpers import read_metric
from moshi_ttt.training import resolve_ckpt_path, train
from moshi_ttt.training.checkpointing import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]


def test_smoke_experiment_trains_and_overfits(compose_cfg):
    cfg = compose_cfg("experiment=smoke", "run_name=overfit", "data.synthetic.num_samples=2",
                      "data.synthetic.num_frames=40", "data.seq_len=40", "data.batch_size=2",
                      "data.random_crop=false", "trainer.max_steps=60", "optim.lr=1e-2", "optim.warmup_steps=0",
                      "model.lora.rank=16", "data.val_shards=null")
    summary = train(cfg)
    assert summary["global_step"] == 60
    loss = read_metric(summary["run_dir"], "train/loss")
    first = sum(loss[s] for s in range(5)) / 5
    last = sum(loss[s] for s in range(55, 60)) / 5
    assert last < 0.8 * first, (first, last)
    counts = summary["param_counts"]
    assert 0 < counts["trainable"] < counts["frozen"]


def _resume_overrides(run_name):
    return ("experiment=smoke", f"run_name={run_name}", "optim.total_steps=16", "data.val_shards=null",
            "callbacks.model_checkpoint.every_n_train_steps=4")


def test_resume_is_exact(compose_cfg):
    straight = train(compose_cfg(*_resume_overrides("straight"), "trainer.max_steps=16"))
    first = train(compose_cfg(*_resume_overrides("interrupted"), "trainer.max_steps=8"))
    assert first["resumed_from"] is None
    second = train(compose_cfg(*_resume_overrides("interrupted"), "trainer.max_steps=16"))
    assert second["resumed_from"].endswith("last.ckpt") and second["global_step"] == 16
    a = read_metric(straight["run_dir"], "train/loss")
    b = read_metric(second["run_dir"], "train/loss")
    assert sorted(a) == sorted(b) == list(range(16))
    for step in range(16):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    lr_a, lr_b = read_metric(straight["run_dir"], "train/lr"), read_metric(second["run_dir"], "train/lr")
    assert all(abs(lr_a[s] - lr_b[s]) < 1e-12 for s in range(16))


def test_checkpoint_holds_only_what_trains(compose_cfg):
    cfg = compose_cfg("experiment=smoke", "run_name=ckpt", "trainer.max_steps=10", "data.val_shards=null")
    summary = train(cfg)
    ckpt_path = Path(summary["checkpoint_dir"]) / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(".ttt." in k or "ttt_norm" in k for k in keys), keys[:5]
    stored = sum(v.numel() for v in ckpt["state_dict"].values())
    assert stored == summary["param_counts"]["trainable"]
    # The file is far smaller than the frozen base it leaves out (fp32 bytes).
    assert ckpt_path.stat().st_size < 4 * summary["param_counts"]["frozen"] / 2
    assert "TokenDataModule" in ckpt and "rng_states" in ckpt
    # The whole resolved run config travels with the weights, as plain types (export/serving read it).
    # ttt under its current names only (the schema's deprecated fields are not recorded).
    from moshi_ttt.training.run import recorded_config

    stored_cfg = ckpt["moshi_ttt_config"]
    assert stored_cfg == recorded_config(cfg)
    assert type(stored_cfg) is dict and stored_cfg["ttt"]["variant"] == cfg.ttt.variant
    assert stored_cfg["ttt"]["layer_indices"] == cfg.ttt.layer_indices
    assert not {"layers", "layer", "window", "hybrid_alpha_init"} & set(stored_cfg["ttt"])


def test_bad_overrides_fail_before_compute(compose_cfg, tmp_path):
    with pytest.raises(MissingConfigException, match="no_such_model"):
        compose_cfg("model=no_such_model")
    with pytest.raises(ValueError, match="data.seq_len"):
        train(compose_cfg("experiment=smoke", "run_name=bad1", "data.seq_len=0"))
    with pytest.raises(ValueError, match="data.seq_len"):
        train(compose_cfg("experiment=smoke", "run_name=bad2", "data.seq_len=-5"))
    missing = tmp_path / "no" / "such" / "shards"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(compose_cfg("experiment=smoke", "run_name=bad3", "data=shards", f"data.train_shards={missing}"))
    with pytest.raises(ValueError, match="run_name"):
        train(compose_cfg("experiment=smoke", "run_name=a/b"))
    with pytest.raises(ValueError, match=r"curriculum.stages.1.ttt_mini_batch_size=32"):
        train(compose_cfg("experiment=smoke", "run_name=bad4", "curriculum=demo",
                          "curriculum.stages.1.ttt_mini_batch_size=32"))
    assert not (tmp_path / "runs" / "bad1" / "checkpoints").exists()
    assert not (tmp_path / "runs" / "bad3").exists()


def test_missing_ckpt_path_starts_fresh_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="moshi_ttt"):
        assert resolve_ckpt_path(str(tmp_path / "later.ckpt"), tmp_path) is None
        assert resolve_ckpt_path("last", tmp_path) is None
    assert "does not exist yet: starting fresh" in caplog.text
    assert "starting fresh" in caplog.text.split("\n")[-2]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


@pytest.mark.slow
def test_ddp_sim_two_ranks_see_disjoint_samples(tmp_path):
    log_dir = tmp_path / "samples"
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(tmp_path), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "experiment=smoke", "trainer=ddp_sim", "run_name=ddp",
           "trainer.max_steps=6", "data.resampled=false", "data.val_shards=null",
           "callbacks.model_checkpoint.every_n_train_steps=3",
           "+callbacks.sample_log._target_=moshi_ttt.training.callbacks.SampleLog",
           f"+callbacks.sample_log.dirpath={log_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = [set(line.split("\t")[1].strip() for line in (log_dir / f"rank{r}.txt").read_text().splitlines())
            for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 12  # 6 steps x batch 2, no repeats within a rank
    assert not keys[0] & keys[1]
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    positions = ckpt["TokenDataModule"]["positions"]  # rank -> source -> stream -> position
    assert sorted(positions) == [0, 1] and set(positions[0]["train"]) != set(positions[1]["train"])
    assert ckpt["TokenDataModule"]["samples"] == {0: {"train": 12}, 1: {"train": 12}}
