"""Runs that cannot collide: one live run per name, sweep jobs apart, no resume under another config,
a damaged newest checkpoint never ends (or silently restarts) a run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moshi_ttt.training import train
from moshi_ttt.training.rundir import RunDirLocked, RunLock, is_launching_process

REPO = Path(__file__).resolve().parents[1]
SMOKE = ("experiment=smoke", "data.val_shards=null", "callbacks.model_checkpoint.every_n_train_steps=2",
         "optim.total_steps=6")


def _hold_lock(run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    code = (f"import sys, time; sys.path.insert(0, {str(REPO / 'src')!r}); "
            "from moshi_ttt.training.rundir import RunLock; "
            f"RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_live_run_with_the_same_name_is_refused(tmp_path, compose_cfg, monkeypatch):
    run_dir = tmp_path / "runs" / "busy"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunDirLocked, match=rf"{run_dir}.*pid {holder.pid}"):
            train(compose_cfg(*SMOKE, "run_name=busy", "trainer.max_steps=2"))
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(run_dir).acquire().release()  # the dead holder's lock is gone with it

    # A SLURM requeue of the same job takes over from its (stopped) predecessor; another job may not.
    holder = _hold_lock(run_dir, {"SLURM_JOB_ID": "77"})
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "78")
        with pytest.raises(RunDirLocked, match="SLURM job 77"):
            RunLock(run_dir).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        RunLock(run_dir).acquire().release()
    finally:
        holder.kill()
        holder.wait()
    # Ranks other than the launching process share the run directory without taking the lock.
    monkeypatch.delenv("SLURM_JOB_ID")
    assert is_launching_process()
    for var in ("LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"):
        monkeypatch.setenv(var, "1")
        assert not is_launching_process()
        monkeypatch.setenv(var, "0")
    assert is_launching_process()


@pytest.mark.parametrize("name", [".", "..", "a/b", "../escape"])
def test_run_name_must_be_one_plain_path_component(compose_cfg, tmp_path, name):
    with pytest.raises(ValueError, match="run_name"):
        train(compose_cfg(*SMOKE, f"run_name={name}", "trainer.max_steps=1"))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "runs" / "checkpoints").exists()


def test_resume_under_a_different_config_fails_naming_the_keys(compose_cfg, caplog):
    first = train(compose_cfg(*SMOKE, "run_name=cfg", "trainer.max_steps=2"))
    last = Path(first["checkpoint_dir"]) / "last.ckpt"
    with pytest.raises(ValueError, match=r"optim\.lr: 0\.003 -> 0\.01.*seed: 0 -> 1"):
        train(compose_cfg(*SMOKE, "run_name=cfg", "trainer.max_steps=4", "optim.lr=1e-2", "seed=1"))
    assert torch.load(last, weights_only=False)["global_step"] == 2  # nothing trained
    # Where it writes, how it logs and how long it runs may change between attempts.
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        again = train(compose_cfg(*SMOKE, "run_name=cfg", "trainer.max_steps=4", "callbacks.progress.every_n_steps=3"))
        assert again["global_step"] == 4 and "changed settings" not in caplog.text
        changed = train(compose_cfg(*SMOKE, "run_name=cfg", "trainer.max_steps=6", "optim.lr=1e-2",
                                    "resume.allow_config_change=true"))
    assert changed["global_step"] == 6
    assert "changed settings" in caplog.text and "optim.lr: 0.003 -> 0.01" in caplog.text


def test_damaged_or_missing_last_ckpt_falls_back_to_the_newest_that_loads(compose_cfg, caplog):
    first = train(compose_cfg(*SMOKE, "run_name=trunc", "trainer.max_steps=4"))
    ckpts = Path(first["checkpoint_dir"])
    assert {"step00000002.ckpt", "step00000004.ckpt", "last.ckpt"} <= {p.name for p in ckpts.iterdir()}
    # A kill during the first last.ckpt write: no last.ckpt, a temp file, an intact step checkpoint.
    (ckpts / "last.ckpt").unlink()
    (ckpts / "step00000004.ckpt").unlink()
    (ckpts / ".last.ckpt.tmp-4242").write_bytes(b"PK\x03\x04 half a checkpoint")
    resumed = train(compose_cfg(*SMOKE, "run_name=trunc", "trainer.max_steps=4"))
    assert resumed["resumed_from"].endswith("step00000002.ckpt") and resumed["global_step"] == 4
    assert not (ckpts / ".last.ckpt.tmp-4242").exists()
    # A truncated last.ckpt (disk full, a copy cut short): named in the log, the step file next to it is used.
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        again = train(compose_cfg(*SMOKE, "run_name=trunc", "trainer.max_steps=6"))
    assert again["resumed_from"].endswith("step00000004.ckpt") and again["global_step"] == 6
    assert f"checkpoint {ckpts / 'last.ckpt'} cannot be loaded" in caplog.text
    # A kill while ModelCheckpoint wrote step 6's file, after last.ckpt of step 6 was complete: the
    # resume from last.ckpt restores the step file (same state), it does not stay missing.
    (ckpts / "step00000006.ckpt").unlink()
    train(compose_cfg(*SMOKE, "run_name=trunc", "trainer.max_steps=8"))
    restored = torch.load(ckpts / "step00000006.ckpt", map_location="cpu", weights_only=False)
    assert restored["global_step"] == 6 and (ckpts / "step00000008.ckpt").exists()
    # Nothing loads at all: an error, not a silent fresh start.
    for p in ckpts.glob("*.ckpt"):
        p.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no checkpoint in .* loads"):
        train(compose_cfg(*SMOKE, "run_name=trunc", "trainer.max_steps=10"))


@pytest.mark.slow
def test_multirun_jobs_get_their_own_run(tmp_path):
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(tmp_path), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=smoke", "optim.lr=1e-3,3e-3",
                           "trainer.max_steps=3", "data.val_shards=null",
                           "callbacks.model_checkpoint.every_n_train_steps=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2, runs
    lrs = set()
    for run in runs:
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["global_step"] == 3  # each job trained its own 3 steps; none "resumed" another's
        assert ckpt["moshi_ttt_config"]["run_name"] == run.name and run.name.startswith("smoke-")
        lrs.add(ckpt["moshi_ttt_config"]["optim"]["lr"])
    assert lrs == {1e-3, 3e-3}
    assert "resuming from" not in proc.stdout + proc.stderr, time.time() - t0


def test_deepspeed_checkpoint_directories_and_leftovers(tmp_path):
    """DeepSpeed writes a checkpoint as a directory (``latest`` + ``checkpoint/*model_states.pt``):
    a damaged one is passed over like a damaged file, and an interrupted save's ``.NAME.tmp`` goes."""
    from moshi_ttt.training.deepspeed_strategy import previous_checkpoint
    from moshi_ttt.training.rundir import newest_loadable_checkpoint, remove_temp_files

    ckpts = tmp_path / "checkpoints"

    def ds_dir(path: Path, step: int) -> Path:
        (path / "checkpoint").mkdir(parents=True)
        (path / "latest").write_text("checkpoint")
        torch.save({"global_step": step, "moshi_ttt_config": {"seed": 0}}, path / "checkpoint" / "mp_rank_00_model_states.pt")
        return path

    last = ds_dir(ckpts / "last.ckpt", 7)
    old = ds_dir(previous_checkpoint(last), 6)
    tmp = ds_dir(ckpts / ".last.ckpt.tmp", 8)
    assert newest_loadable_checkpoint([last, old], ckpts)[0] == last
    states = last / "checkpoint" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:40])  # the rename of a complete save never happened
    path, content = newest_loadable_checkpoint([last, old], ckpts)
    assert path == old and content["global_step"] == 6
    assert remove_temp_files(ckpts) == [tmp] and not tmp.exists() and old.exists()
