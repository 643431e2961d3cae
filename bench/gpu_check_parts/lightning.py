"""Part LIGHTNING: train.py through Lightning under each trainer, a straight run against one
stopped half-way and resumed."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import LIGHTNING, REPO, Events, Job, Row, Settings, log_tail

# Part LIGHTNING: the trainer config on a GPU machine, and its CPU stand-in for --dry-run.
TRAINERS: dict[str, tuple[list[str], list[str]]] = {
    "gpu": (["trainer=gpu"], ["trainer=cpu"]),
    "ddp": (["trainer=ddp", "trainer.devices=1"], ["trainer=ddp_sim"]),
    "deepspeed_zero2": (["trainer=deepspeed_zero2", "trainer.devices=1"], ["trainer=deepspeed_cpu_sim"]),
    "deepspeed_zero3": (["trainer=deepspeed_zero3", "trainer.devices=1"],
                        ["trainer=deepspeed_cpu_sim", "trainer.strategy.config.zero_optimization.stage=3"]),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(s: Settings, trainer: str, root: Path, run_name: str, steps: int, log: Path) -> subprocess.Popen:
    overrides = TRAINERS[trainer][1 if s.dry_run else 0]
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(root), "NO_TORCH_COMPILE": "1", "WANDB_MODE": "offline",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    if s.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "train.py", "experiment=smoke", *overrides, f"run_name={run_name}",
           f"trainer.max_steps={steps}", f"optim.total_steps={s.train_steps}", "data.val_shards=null",
           f"callbacks.model_checkpoint.every_n_train_steps={s.cut_step}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


_LAUNCHED: list[subprocess.Popen] = []  # train.py runs of this worker, each in its own process group


def _kill_launched(*_signal) -> None:
    """SIGTERM from the parent (budget spent): take the train.py runs (and their DDP ranks) down too."""
    for proc in _LAUNCHED:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    if _signal:
        os._exit(143)


def _run_all(s: Settings, launches: list[tuple], deadline: float) -> dict:
    """Run (key, trainer, root, run_name, steps, log) launches, ``s.concurrent_launches`` at a time,
    until ``deadline`` (``time.time()``); key -> (exit code or "timeout", seconds)."""
    pending, running, results = list(launches), {}, {}
    while pending or running:
        while pending and len(running) < s.concurrent_launches:
            key, *spec = pending.pop(0)
            proc = _launch(s, *spec)
            _LAUNCHED.append(proc)
            running[key] = (proc, time.perf_counter())
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                results[key] = (proc.returncode, time.perf_counter() - t0)
                del running[key]
            elif time.time() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                results[key] = ("timeout", time.perf_counter() - t0)
                del running[key]
        time.sleep(0.2)
    return results


def compare_resume(straight_dir: Path, resumed_dir: Path, steps: int, cut: int, tol: float) -> tuple[str, str, dict]:
    """(status, message, data): the resumed run's per-step losses against the straight run's."""
    import csv

    from moshi_ttt.training.metrics_io import read_csv_metrics

    a, b = read_csv_metrics(straight_dir), read_csv_metrics(resumed_dir)
    la, lb = a.get("train/loss", {}), b.get("train/loss", {})
    expected = list(range(steps))
    if sorted(la) != expected or sorted(lb) != expected:
        return "FAIL", f"logged steps straight {sorted(la)}, resumed {sorted(lb)}; expected 0..{steps - 1}", {}
    attempts = sorted(resumed_dir.glob("csv/*/metrics.csv"))
    first_resumed = None
    if len(attempts) >= 2:
        with open(attempts[-1], newline="") as f:
            logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        first_resumed = min(logged) if logged else None
    diffs = [abs(la[i] - lb[i]) / max(1.0, abs(la[i])) for i in expected]
    grad_norms = a.get("train/grad_norm", {})
    data = {"max_rel_diff": max(diffs), "losses": [la[i] for i in expected], "first_resumed_step": first_resumed,
            "grad_norms": [grad_norms.get(i) for i in expected]}
    if first_resumed != cut:
        return "FAIL", f"the second attempt started at step {first_resumed}, not at the cut ({cut}): no resume", data
    if not all(math.isfinite(v) for v in (*la.values(), *lb.values())):
        return "FAIL", "non-finite loss", data
    # Trains: a non-zero gradient reaches the adapters at every step. (Lightning's DeepSpeed
    # strategy keeps gradients inside the engine, so the module logs no train/grad_norm there.)
    if grad_norms and (len(grad_norms) < steps or not all(v > 0 for v in grad_norms.values())):
        return "FAIL", f"train/grad_norm missing or zero at some step: {data['grad_norms']}", data
    if max(diffs) > tol:
        worst = max(expected, key=lambda i: diffs[i])
        return "FAIL", (f"resumed loss differs at step {worst}: {lb[worst]:.6g} vs {la[worst]:.6g} "
                        f"(rel {diffs[worst]:.1e} > {tol:.0e})"), data
    return "PASS", "" if grad_norms else "no train/grad_norm logged", data


def part_lightning(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    deadline = job.deadline - 10  # stop the runs ourselves, before the parent stops this worker
    signal.signal(signal.SIGTERM, _kill_launched)
    base = job.out_dir / f"part{LIGHTNING}"
    for case in cases:
        events.write(event="start", case=case["id"])
        shutil.rmtree(base / case["id"], ignore_errors=True)  # an earlier check's runs would be resumed
    # round 1: the straight run and the first half of the interrupted one; round 2: the resume
    round1 = []
    for case in cases:
        t = case["id"]
        round1.append(((t, "straight"), t, base / t / "straight", "straight", s.train_steps, base / t / "straight.log"))
        round1.append(((t, "cut"), t, base / t / "cut", "cut", s.cut_step, base / t / "cut.log"))
    first = _run_all(s, round1, deadline)
    round2 = [((c["id"], "resume"), c["id"], base / c["id"] / "cut", "cut", s.train_steps, base / c["id"] / "resume.log")
              for c in cases if first[(c["id"], "straight")][0] == 0 and first[(c["id"], "cut")][0] == 0]
    second = _run_all(s, round2, deadline)
    for case in cases:
        t = case["id"]
        label = " ".join(TRAINERS[t][1 if s.dry_run else 0])
        runs = {**{k[1]: v for k, v in first.items() if k[0] == t}, **{k[1]: v for k, v in second.items() if k[0] == t}}
        bad = [(name, rc) for name, (rc, _) in runs.items() if rc != 0]
        wall = sum(sec for _, sec in runs.values())
        if bad:
            name, rc = bad[0]
            if rc == "timeout":
                events.row(Row(LIGHTNING, label, "TIMEOUT", note=f"{name} run stopped after {runs[name][1]:.0f} s: part budget "
                                                         f"spent (log: {base / t / f'{name}.log'})"))
            else:
                events.row(Row(LIGHTNING, label, "FAIL", note=f"{name} run exit {rc}: {log_tail(base / t / f'{name}.log')}"))
        else:
            status, msg, data = compare_resume(base / t / "straight" / "runs" / "straight",
                                               base / t / "cut" / "runs" / "cut", s.train_steps, s.cut_step,
                                               s.resume_tol)
            data["wall_s"] = wall
            measured = (f"{s.train_steps} steps, stop at {s.cut_step} + resume: max rel |dloss| "
                        f"{data.get('max_rel_diff', float('nan')):.1e}")
            losses = data.get("losses") or [float("nan")]
            note = f"loss {losses[0]:.3g} -> {losses[-1]:.3g}, 3 launches {wall:.0f} s"
            events.row(Row(LIGHTNING, label, status, measured, "uninterrupted run", "",
                           f"{msg}; {note}" if msg else note, data))
        events.write(event="done", case=t)
