"""Preemption: checkpoint at a safe point and requeue, owned by one component (this one).

SLURM sends SIGUSR1 some seconds before it stops a job (``--signal=SIGUSR1@90``). The signal
handler only sets a flag; at the end of the next optimizer step, after every other callback's
batch-end work (step and stage-end checkpoints), every rank agrees on it (one scalar
all-reduce), all ranks write ``last.ckpt`` together and ``Preempted`` leaves ``fit`` at once.

Leaving by an exception, not by ``trainer.should_stop``, is what makes the resume exact: a
stop request makes Lightning validate once more, re-save ``last.ckpt`` from inside that
validation and close the epoch, so the checkpoint no longer describes "right after this
step" and the next stage resumed one accumulated batch off. After ``Preempted`` nothing runs
but Lightning's teardown (loggers flushed); the run is in exactly the state of a node lost
right after the checkpoint, which resumes exactly. Only once ``fit`` has returned, the loggers
are closed (the W&B run file complete) and the run directory's lock is released does rank 0
run ``scontrol requeue $SLURM_JOB_ID``
(``requeue_if_preempted``): Slurm kills the job at once when it requeues it. The requeued job reruns the
same command, whose ``run_name`` points at the same run directory, and resumes from that
checkpoint. Lightning's own SLURM auto-requeue (which saves inside the signal handler) is
disabled by ``train()`` so that exactly one component requeues.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from moshi_ttt import signals

logger = logging.getLogger(__name__)


def requeue_command() -> list[str] | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if not job or not re.fullmatch(r"[0-9_]+", job):
        return None
    return ["scontrol", "requeue", job]


class Preempted(Exception):
    """Raised out of ``trainer.fit`` once the preemption checkpoint is on disk (caught by ``train``)."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"preempted: checkpoint of step {step} written to {path}")
        self.step, self.path = step, path


class PreemptionCallback(Checkpoint):
    """A ``Checkpoint`` so that Lightning runs its batch-end hook after every other callback's
    (``_reorder_callbacks`` puts checkpoint callbacks last; ``build_trainer`` puts this one last
    of all): the step's own checkpoints and logged values exist before the run leaves."""

    def __init__(self, checkpoint_dir: str, signal_name: str = "SIGUSR1", requeue: bool = True):
        self.checkpoint_dir = checkpoint_dir
        self.signum = getattr(signal, signal_name)
        self.requeue = requeue
        self._flag = False
        self.preempted = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self._flag = True  # async-signal-safe: the work happens at the next step boundary

    def on_train_start(self, trainer, pl_module) -> None:
        self._previous = signal.signal(self.signum, self._handler)
        if signals.take(self.signum):  # it came during start-up: act at the first step boundary
            logger.warning("preemption signal received during start-up")
            self._flag = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _agreed(self, trainer) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0], device=trainer.strategy.root_device)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop._should_accumulate() and self._agreed(trainer):
            path = Path(self.checkpoint_dir) / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero:
                logger.warning("preemption signal: checkpoint written at step %d to %s", trainer.global_step, path)
            self._flag = False
            self.preempted = True
            raise Preempted(trainer.global_step, path)


def requeue_if_preempted(trainer: L.Trainer) -> bool:
    """After a preempted fit has returned and every log is closed: rank 0 requeues the job
    (Slurm ends this process right away). Returns whether a requeue was asked for."""
    cb = next((c for c in trainer.callbacks if isinstance(c, PreemptionCallback)), None)
    if cb is None or not cb.preempted or not trainer.is_global_zero:
        return False
    cmd = requeue_command() if cb.requeue else None
    if cmd is None:
        logger.warning("not requeued (no SLURM job id, or requeue disabled)")
        return False
    logger.info("requeueing: %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    level = logging.INFO if result.returncode == 0 else logging.ERROR
    logger.log(level, "%s -> exit %d %s", " ".join(cmd), result.returncode, result.stderr.strip())
    return True
