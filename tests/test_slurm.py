"""The project's own Slurm scripts on a real Slurm cluster (slurmctld + slurmd on localhost).

The long jobs are submitted together when the module starts (the fake node has room for all
of them) and each test then follows its own: (b) is driven first because it signals its job
while it runs; (a) checks the uninterrupted run that (b) is compared with.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import read_metric
from recipe_miniature import miniature_overrides, stage_of_step, total_steps
from serve_model import make_dataset_dir
from slurm_cluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Stage 2 (index 1) is long enough to be preempted in its middle, twice.
SHAPES = [(2.56, 3, 2), (16, 10, 1), (24, 3, 1)]
TASKS = ["--ntasks-per-node=2", "--cpus-per-task=1"]  # the script asks for 8 GPUs' worth of tasks
STEP = re.compile(r"^step (\d+)/(\d+)")
LIMIT_STEPS = 300
ATTEMPT = re.compile(r"^moshi-ttt: run \S+, attempt \S+, restart count (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
    yield c
    c.stop()


class Job:
    """One submitted training job: its id, output file and run directory."""

    def __init__(self, cluster: SlurmCluster, out: Path, run_name: str, script: str, sbatch_args: list[str],
                 overrides: list[str], env: dict):
        self.cluster, self.out, self.run_name = cluster, out, run_name
        self.run_dir = out / "runs" / run_name
        args = [*sbatch_args, f"--output={out}/{run_name}-%j.out", str(REPO / "slurm" / script),
                f"run_name={run_name}", *overrides]
        self.id = cluster.sbatch(*args, env=env, cwd=out)
        self.log = out / f"{run_name}-{self.id}.out"  # one file per job, appended by its requeues

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def attempts(self) -> list[list[str]]:
        """Output lines per attempt (common.sh prints one line when an attempt starts)."""
        parts: list[list[str]] = []
        for line in self.text().splitlines():
            if ATTEMPT.match(line):
                parts.append([])
            if parts:
                parts[-1].append(line)
        return parts

    def steps(self, attempt: int) -> list[int]:
        parts = self.attempts()
        if attempt >= len(parts):
            return []
        return [int(m.group(1)) for m in map(STEP.match, parts[attempt]) if m]

    def wait_for(self, predicate, timeout: float, what: str, tick=None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            if tick:
                tick()
            state = self.cluster.job(self.id).get("JobState")
            if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            time.sleep(0.2)
        raise AssertionError(f"job {self.id} ({self.run_name}): {what} did not happen "
                             f"(state {self.cluster.job(self.id).get('JobState')})\n{self.text()[-4000:]}")


def _job_env(out: Path, trainer: str) -> dict:
    return {"MOSHI_TTT_REPO": str(REPO), "MOSHI_TTT_PYTHON": sys.executable, "MOSHI_TTT_OUTPUT": str(out),
            "MOSHI_TTT_TRAINER": trainer, "NO_TORCH_COMPILE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO / "src")}


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """The recipe miniature twice (uninterrupted reference, and the one to preempt) and the
    time-limit job, submitted at once."""
    out = tmp_path_factory.mktemp("slurm-out")
    codec = make_dataset_dir(out / "codec")
    recipe = ["experiment=moshiko_ttt_30min", *miniature_overrides(codec, trainer=None, shapes=SHAPES),
              "callbacks.model_checkpoint.every_n_train_steps=100"]
    env = _job_env(out, "deepspeed_cpu_sim")
    made = {
        "ref": Job(cluster, out, "ref", "train.sbatch", TASKS, recipe, env),
        "pre": Job(cluster, out, "pre", "train.sbatch", TASKS, recipe, env),
        # (c) a 3-minute limit with the early warning 150 s before it: the warning comes about
        # 30 s in (Slurm sends it to the running srun step, so not before the script has
        # started it), long before 300 steps of 384 frames are done.
        "limit": Job(cluster, out, "limit", "train.sbatch",
                     ["--ntasks-per-node=1", "--cpus-per-task=1", "--time=3", "--signal=USR1@150"],
                     ["experiment=smoke", f"trainer.max_steps={LIMIT_STEPS}", f"optim.total_steps={LIMIT_STEPS}",
                      "data.seq_len=384", "data.val_shards=null", "callbacks.model_checkpoint.every_n_train_steps=1000",
                      "callbacks.progress.every_n_steps=25"],
                     _job_env(out, "cpu")),
    }

    def tick():
        """Called at every poll of every test of this module: requeued recipe jobs start at
        once; the time-limit job gets a longer limit before it starts again (see test c)."""
        cluster.release_requeued(made["ref"].id)
        cluster.release_requeued(made["pre"].id)
        limit = made["limit"].id
        info = cluster.job(limit)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            cluster.run("scontrol", "update", f"JobId={limit}", "TimeLimit=20")
            cluster.release_requeued(limit)

    made["tick"] = tick
    return made


def _losses_equal(a: dict[int, float], b: dict[int, float], n: int) -> float:
    assert sorted(a) == list(range(n)), sorted(a)
    assert sorted(b) == list(range(n)), sorted(b)
    worst = max(abs(a[s] - b[s]) for s in range(n))
    assert worst <= 1e-6, worst
    return worst


def test_b_preempted_twice_in_stage_2_resumes_exactly(cluster, jobs):
    pre, tick = jobs["pre"], jobs["tick"]
    n = total_steps(SHAPES)
    stage2 = [s for s in range(n) if stage_of_step(s, SHAPES) == 1]
    timings = []
    for attempt in range(2):
        # "step k" lines count the steps done. The first signal comes once a step of stage 2 is
        # done, the second once the resumed attempt has done two more.
        def ready(attempt=attempt):
            steps = pre.steps(attempt)
            return len(steps) >= 2 if attempt else bool(steps) and steps[-1] >= stage2[0] + 1

        pre.wait_for(ready, 600, f"attempt {attempt} reaching stage 2", tick)
        t_signal = time.monotonic()
        assert cluster.run("scancel", "--signal=USR1", str(pre.id)).returncode == 0
        saved = pre.wait_for(lambda a=attempt: re.findall(r"checkpoint written at step (\d+)",
                                                          "\n".join(pre.attempts()[a])), 300,
                             "the preemption checkpoint", tick)
        stopped_at = int(saved[-1])
        resumed_step = pre.wait_for(lambda a=attempt: (pre.steps(a + 1) or [None])[0], 600,
                                    "the requeued attempt's first step", tick)
        timings.append({"attempt": attempt, "checkpoint_step": stopped_at, "first_step_after": resumed_step,
                        "signal_to_resumed_step_s": round(time.monotonic() - t_signal, 1)})
        assert resumed_step == stopped_at + 1  # the next step, nothing replayed or skipped
        if attempt == 0:
            assert stage_of_step(stopped_at, SHAPES) == 1 and stage_of_step(stopped_at - 1, SHAPES) == 1
            assert "resuming from" in "\n".join(pre.attempts()[1])
    info = cluster.wait(pre.id, 900, tick=tick)
    assert info["JobState"] == "COMPLETED", pre.text()[-4000:]
    assert info["Restarts"] == "2"
    ref_info = cluster.wait(jobs["ref"].id, 900, tick=tick)
    assert ref_info["JobState"] == "COMPLETED", jobs["ref"].text()[-4000:]
    worst = _losses_equal(read_metric(jobs["ref"].run_dir, "train/loss"), read_metric(pre.run_dir, "train/loss"), n)
    # One W&B run across the three attempts.
    runs = sorted(p.name for p in (pre.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and all(r.endswith("-pre") for r in runs), runs
    (pre.out / "preemption_timings.json").write_text(json.dumps({"timings": timings, "max_abs_dloss": worst}))
    print(json.dumps({"timings": timings, "max_abs_dloss": worst}))


def test_a_sbatch_runs_the_recipe_miniature_with_2_tasks(cluster, jobs):
    ref = jobs["ref"]
    info = cluster.wait(ref.id, 900, tick=jobs["tick"])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", ref.text()[-4000:]
    assert "MEMBER: 1/2" in ref.text() and "MEMBER: 2/2" in ref.text()  # two ranks, through srun
    losses = read_metric(ref.run_dir, "train/loss")
    assert sorted(losses) == list(range(total_steps(SHAPES)))
    for i, name in enumerate(["15s", "5min", "30min"]):
        assert (ref.run_dir / "checkpoints" / f"stage{i}-{name}-end.ckpt").exists()
    attempts = list((ref.run_dir / "attempts").iterdir())
    assert len(attempts) == 1 and attempts[0].name.startswith(f"{ref.id}-")


def test_c_time_limit_requeues_before_the_limit_and_finishes(cluster, jobs):
    """Slurm never requeues a job that reached its limit (TIMEOUT): the trainer must checkpoint
    and requeue itself on the early warning. How far the first attempt gets depends on this
    machine's speed, so once the job is back in the queue its limit is raised (as an operator
    would): the second attempt then always finishes, and the first never ends as TIMEOUT."""
    job = jobs["limit"]
    info = cluster.wait(job.id, 1200, release=False, tick=jobs["tick"])
    assert info["JobState"] == "COMPLETED", job.text()[-4000:]
    assert info["Restarts"] == "1"
    first = job.attempts()[0]
    assert any("preemption signal" in line for line in first), "\n".join(first)[-3000:]
    assert not any("DUE TO TIME LIMIT" in line for line in first)
    assert sorted(read_metric(job.run_dir, "train/loss")) == list(range(LIMIT_STEPS))


def test_d_multinode_script_through_srun(cluster, tmp_path):
    env = _job_env(tmp_path, "deepspeed_cpu_sim")
    job = Job(cluster, tmp_path, "mn", "train_multinode.sbatch", ["--nodes=1", *TASKS],
              ["experiment=smoke", "trainer.max_steps=4", "optim.total_steps=4", "data.val_shards=null"], env)
    info = cluster.wait(job.id, 600)
    assert info["JobState"] == "COMPLETED", job.text()[-4000:]
    assert "MEMBER: 1/2" in job.text() and "MEMBER: 2/2" in job.text()
    assert sorted(read_metric(job.run_dir, "train/loss")) == list(range(4))


def test_e_hydra_multirun_through_the_submitit_slurm_launcher(cluster, tmp_path):
    env = {**cluster.env, **_job_env(tmp_path, "cpu")}
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "experiment=smoke", "trainer.max_steps=3",
           "optim.total_steps=3", "data.val_shards=null", "optim.lr=1e-3,3e-3",
           "hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=15", "hydra.launcher.setup=[]"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if (p / "checkpoints").is_dir()]
    assert len(runs) == 2, [p.name for p in runs]
    for run in runs:
        assert sorted(read_metric(run, "train/loss")) == [0, 1, 2], run
    logs = list(tmp_path.rglob("*_log.out"))  # submitit's per-job logs under the sweep dir
    assert len(logs) == 2, logs


def _wait_for_tmp(ckpt_dir: Path, job: Job, timeout: float) -> str:
    """Poll for a checkpoint being written (a .tmp file, or a DeepSpeed tag dir) and return its name."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ckpt_dir.is_dir():
            for p in ckpt_dir.iterdir():
                if ".tmp" in p.name:
                    return p.name
        if job.cluster.job(job.id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint write caught\n{job.text()[-3000:]}")


def test_f_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(cluster, tmp_path):
    import torch

    env = _job_env(tmp_path, "cpu")
    n = 60
    overrides = ["experiment=smoke", f"trainer.max_steps={n}", f"optim.total_steps={n}", "data.val_shards=null",
                 "callbacks.model_checkpoint.every_n_train_steps=1"]
    caught = []
    ckpt_dir = tmp_path / "runs" / "kill" / "checkpoints"
    for how in (None, "KILL"):  # scancel as a node failure would: TERM then KILL; then KILL at once
        job = Job(cluster, tmp_path, "kill", "train.sbatch", ["--ntasks-per-node=1", "--cpus-per-task=1"],
                  overrides, env)
        job.wait_for(lambda j=job: len(j.steps(0)) >= 1, 600, "a first step")
        caught.append(_wait_for_tmp(ckpt_dir, job, 120))
        cmd = ["scancel", str(job.id)] if how is None else ["scancel", f"--signal={how}", str(job.id)]
        assert cluster.run(*cmd).returncode == 0
        info = cluster.wait(job.id, 120, release=False)
        assert info["JobState"] in ("CANCELLED", "FAILED", "COMPLETED"), info
        # What is on disk is either a whole checkpoint or a temp file the next start removes.
        for p in ckpt_dir.glob("*.ckpt"):
            torch.load(p, map_location="cpu", weights_only=False)
    job = Job(cluster, tmp_path, "kill", "train.sbatch", ["--ntasks-per-node=1", "--cpus-per-task=1"], overrides, env)
    info = cluster.wait(job.id, 600)
    assert info["JobState"] == "COMPLETED", job.text()[-4000:]
    assert "resuming from" in job.text()
    assert sorted(read_metric(tmp_path / "runs" / "kill", "train/loss")) == list(range(n))
    assert not [p for p in ckpt_dir.iterdir() if ".tmp" in p.name]
    print(json.dumps({"caught_writes": caught}))
