"""Exact resume from every checkpoint a run writes: the demo curriculum, killed (SIGKILL) and
preempted (SIGUSR1) at random points spread over all its stages, including right at stage ends,
and rerun until done, logs the same per-step losses and validations as an uninterrupted run.

The data is a mixture of two sources whose weights change with the stage (the synthetic corpus
alone, then mixed with token-level recall conversations), and the recall callback scores a held-out
recall set at every validation: a resume must continue every stream of every source, and the
mixture's draws, where the uninterrupted run was."""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The demo curriculum's three stages (batch 4 / 2x2 accumulated + packing / 1x2 + packing), with
# fewer steps and shorter sequences so that a run takes seconds; stage ends at steps 6, 10, 14.
STAGE_ENDS = (6, 10, 14)
DEMO = ("experiment=smoke", "curriculum=demo", "curriculum.stages.0.steps=6", "curriculum.stages.1.steps=4",
        "curriculum.stages.2.steps=4", "curriculum.stages.1.seconds=5.12", "curriculum.stages.2.seconds=10.24",
        "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.progress.every_n_steps=1",
        "callbacks.preemption.requeue=false")
# Per-step values that an interrupted run must log exactly as the uninterrupted one.
EXACT = ("train/loss", "val/loss", "train/lr", "epoch", "data/synthetic/samples", "data/recall/samples",
         "val/recall_in_window", "val/recall_beyond_window")


def mixture_overrides(root: Path) -> tuple[str, ...]:
    """A second source (token-level recall conversations, ~100 frames each) mixed in with weights that
    change per stage, and the recall callback on a held-out set with facts inside and beyond a
    40-frame window (the tiny model's own window covers them all, so the window is given)."""
    from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards

    def spec(delay):
        return TokenRecallSpec(delay_frames=delay, fact_start_jitter=10, tail_frames=5)

    if not (root / "heldout_far" / "index.json").exists():  # written once, read by every attempt
        write_token_recall_shards(root / "recall_train", 48, spec(40), seed=0, samples_per_shard=6)
        write_token_recall_shards(root / "heldout_near", 2, spec(20), seed=1)
        write_token_recall_shards(root / "heldout_far", 2, spec(60), seed=2)
    return ("+data.sources.synthetic.shards=${data.train_shards}", f"+data.sources.recall.shards={root / 'recall_train'}",
            "++curriculum.stages.0.sources={synthetic: 1.0}", "++curriculum.stages.1.sources={synthetic: 1.0, recall: 1.0}",
            "++curriculum.stages.2.sources={synthetic: 0.5, recall: 1.0}", "callbacks=[default,recall]",
            f"callbacks.recall.shards=[{root / 'heldout_near'},{root / 'heldout_far'}]", "callbacks.recall.window_frames=40")


def _rows(run_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> step -> value over all attempts (a later attempt overwrites), epoch included."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("csv/*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key != "step" and value not in (None, ""):
                        out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


def _attempt(run_name: str, env: dict, kill_at: int | None = None, sig=None, delay: float = 0.0,
             extra: tuple[str, ...] = ()) -> tuple[str, bool]:
    """Run train.py; with ``kill_at``, signal it ``delay`` s after it reports that step (or a later
    one: a preemption may have stopped the previous attempt past it). (log, signalled)"""
    cmd = [sys.executable, "train.py", *DEMO, *mixture_overrides(Path(env["MOSHI_TTT_OUTPUT"])), f"run_name={run_name}",
           *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, signalled = [], False
    for line in proc.stdout:
        lines.append(line)
        reported = re.match(r"step (\d+)/", line)
        if kill_at is not None and reported and int(reported.group(1)) >= kill_at:
            time.sleep(delay)
            if proc.poll() is None:  # a fast machine may have finished the run meanwhile
                proc.send_signal(sig)
                signalled = True
            break
    out, _ = proc.communicate(timeout=600)
    log = "".join(lines) + out
    if signalled and sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
    else:
        assert proc.returncode == 0, log[-3000:]
    return log, signalled


@pytest.mark.slow
@pytest.mark.parametrize("preempt", [False, True], ids=["sigkill", "sigkill+sigusr1"])
def test_random_kills_over_every_stage_resume_exactly(tmp_path, preempt):
    """``preempt=False``: a node lost at random moments (SIGKILL only). ``preempt=True``: two of
    the interruptions are SIGUSR1 preemptions (checkpoint, clean exit) instead."""
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(tmp_path), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline"}
    env.pop("SLURM_JOB_ID", None)
    _attempt("straight", env)

    rng = random.Random(int(os.environ.get("MOSHI_TTT_KILL_SEED", "3")))
    # One point inside each stage and each stage end, in order; SIGUSR1 (preemption) for two of them.
    points = sorted({rng.randint(1, 5), STAGE_ENDS[0], rng.randint(7, 9), STAGE_ENDS[1], rng.randint(11, 13)})
    usr1 = set(rng.sample(points, 2)) if preempt else set()
    kills = []
    for step in points:
        sig = signal.SIGUSR1 if step in usr1 else signal.SIGKILL
        delay = rng.uniform(0.0, 0.3)  # lands in a step, a checkpoint write or a validation
        log, signalled = _attempt("killed", env, step, sig, delay)
        if not signalled:
            break  # the run finished before this signal: nothing left to interrupt
        kills.append((step, sig.name, round(delay, 2), "resuming from" in log))
        if sig == signal.SIGUSR1:
            assert "preemption signal: checkpoint written at step" in log, log[-3000:]
    _attempt("killed", env)
    # Every attempt after one that got past the first step checkpoint (step 3) resumed.
    assert len(kills) >= 3 and all(kills[i][3] for i in range(1, len(kills)) if kills[i - 1][0] >= 4), kills

    a, b = _rows(tmp_path / "runs" / "straight"), _rows(tmp_path / "runs" / "killed")
    assert sorted(a["train/loss"]) == sorted(b["train/loss"]) == list(range(STAGE_ENDS[-1])), kills
    # One validation per stage end, none missing and none added by a preemption.
    assert set(a["val/loss"]) == set(b["val/loss"]) == {end - 1 for end in STAGE_ENDS}, (kills, b["val/loss"])
    assert set(a["val/recall_beyond_window"]) == set(b["val/recall_beyond_window"]) == set(a["val/loss"])
    # The mixture: the corpus alone in the first stage, both sources after it.
    recall = a["data/recall/samples"]
    assert recall[STAGE_ENDS[0] - 1] == 0 < recall[STAGE_ENDS[-1] - 1] < a["data/synthetic/samples"][STAGE_ENDS[-1] - 1]
    for key in EXACT:
        assert set(a[key]) <= set(b[key]), (key, kills)
        worst = max(abs(a[key][s] - b[key][s]) for s in a[key])
        assert worst <= 1e-6, (key, worst, kills)
    # Every step and stage-end checkpoint the interrupted run wrote (some by resumed attempts) holds the
    # same weights and the same loop position as the uninterrupted run's: a resume from any of them is exact.
    import torch

    # None is missing: a step checkpoint whose write a kill cut short is restored on resume.
    ckpts = sorted((tmp_path / "runs" / "straight" / "checkpoints").glob("[st]*.ckpt"))
    assert {p.name for p in ckpts} == {p.name for p in (tmp_path / "runs" / "killed" / "checkpoints").glob("[st]*.ckpt")}
    for path in ckpts:
        ca, cb = (torch.load(d / path.name, map_location="cpu", weights_only=False)
                  for d in (path.parent, tmp_path / "runs" / "killed" / "checkpoints"))
        assert ca["loops"] == cb["loops"], (path.name, kills)
        assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"]), (path.name, kills)
    if not preempt:
        # A new run started from each stage-end checkpoint of the uninterrupted run (the issue's
        # reproduction: the next stage, its validation and the final validation) continues it exactly.
        for i, end in enumerate(STAGE_ENDS):
            ckpt = next((tmp_path / "runs" / "straight" / "checkpoints").glob(f"stage{i}-*-end.ckpt"))
            _attempt(f"from-stage{i}", env, extra=(f"ckpt_path={ckpt}",))
            c = _rows(tmp_path / "runs" / f"from-stage{i}")
            assert sorted(c.get("train/loss", {})) == list(range(end, STAGE_ENDS[-1])), (ckpt.name, c.get("train/loss"))
            assert set(c["val/loss"]) == {e - 1 for e in STAGE_ENDS if e >= end}, (ckpt.name, c["val/loss"])
            for key in EXACT:
                worst = max((abs(a[key][s] - c[key][s]) for s in c.get(key, {})), default=0.0)
                assert worst <= 1e-6, (ckpt.name, key, worst)
    print(f"kills survived: {kills}; max |dloss| {max(abs(a['train/loss'][s] - b['train/loss'][s]) for s in a['train/loss']):.3g}")
