"""Preemption on SLURM, simulated: SIGUSR1 -> checkpoint -> scontrol requeue -> the rerun resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_metric

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_resumes(tmp_path):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (stub_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (stub_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(tmp_path), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{stub_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    cmd = [sys.executable, "train.py", "experiment=smoke", "run_name=preempt", "trainer.max_steps=400",
           "optim.total_steps=400", "data.val_shards=null", "callbacks.model_checkpoint.every_n_train_steps=1000",
           "callbacks.progress.every_n_steps=1", "+trainer.limit_val_batches=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # wait until training is well under way
        lines.append(line)
        if line.startswith("step 5/"):
            proc.send_signal(signal.SIGUSR1)
            break
    out, _ = proc.communicate(timeout=300)
    lines.append(out)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    import torch

    ckpt = torch.load(tmp_path / "runs" / "preempt" / "checkpoints" / "last.ckpt", weights_only=False)
    stopped_at = ckpt["global_step"]
    assert 5 <= stopped_at < 400

    # The requeued job reruns the same command and resumes from that checkpoint.
    resumed = subprocess.run([*cmd[:4], "trainer.max_steps=" + str(stopped_at + 5), *cmd[5:]], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    steps = read_metric(tmp_path / "runs" / "preempt", "train/loss")
    assert sorted(steps) == list(range(stopped_at + 5))


@pytest.mark.slow
def test_sbatch_script_runs_and_snapshots_the_run(tmp_path):
    """slurm/train.sbatch under bash with an srun stub: trains, and records revision + config."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    (stub_dir / "srun").write_text("#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n")
    (stub_dir / "srun").chmod(0o755)
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(tmp_path / "out"), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{stub_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_SUBMIT_DIR": str(REPO), "MOSHI_TTT_TRAINER": "cpu", "MOSHI_TTT_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "slurm/train.sbatch", "experiment=smoke", "run_name=sb", "trainer.max_steps=3",
                           "data.val_shards=null"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "runs" / "sb"
    attempts = list((run_dir / "attempts").iterdir())
    assert len(attempts) == 1 and attempts[0].name.startswith("77-")
    assert "run_name: sb" in (attempts[0] / "config_resolved.yaml").read_text()
    assert len((attempts[0] / "git_revision.txt").read_text().strip()) in (40, len("not a git checkout"))
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
