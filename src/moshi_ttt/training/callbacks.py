"""Lightning callbacks: exact data position and RNG in checkpoints, plain progress for logs."""

from __future__ import annotations

import logging
import sys
import time

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

logger = logging.getLogger(__name__)


def collect_rng_states() -> dict:
    """Every global RNG this process uses, as plain types (checkpoints stay ``weights_only``-loadable)."""
    import random

    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    import random

    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(states["python"]) if not isinstance(states["python"], tuple) else states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _gather_objects(obj, trainer: L.Trainer) -> list:
    """Every rank's ``obj`` (on every rank); just ``[obj]`` without a process group."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


class ResumeStateCallback(L.Callback):
    """Puts what Lightning does not save into the checkpoint: each rank's data position and RNG.

    Every training batch is recorded in the DataModule (each stream's position in each
    source, the mixture's draws, the sequences each source gave) and the running count of
    sequences per source is logged as ``data/<source>/samples`` (summed over ranks). Lightning
    writes the checkpoint from rank 0 only, so position and RNG are gathered from all ranks
    (``dump_checkpoint`` runs on every rank) and each rank takes its own back on resume.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Recorded as the batch starts, not at its end: every checkpoint is written after the batch
        # has trained either way, and a count logged here belongs to this step's metrics row even
        # when a preemption checkpoints and leaves right after the step (MetricsRowAtCheckpoint).
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "record_batch"):
            return
        dm.record_batch(batch)
        for name, count in dm.source_samples().items():
            pl_module.log(f"data/{name}/samples", float(count), reduce_fx="sum", sync_dist=True, batch_size=1)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        dm = trainer.datamodule
        tracks_data = dm is not None and hasattr(dm, "local_state")
        local = {"rng": collect_rng_states(), "data": dm.local_state() if tracks_data else None}
        gathered = _gather_objects(local, trainer)
        checkpoint["rng_states"] = [g["rng"] for g in gathered]
        if tracks_data:
            dm.set_gathered_state([g["data"] for g in gathered])
            checkpoint[type(dm).__qualname__] = dm.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        if len(states) != trainer.world_size:
            logger.warning("checkpoint has RNG states of %d rank(s), this run has %d: RNG not restored",
                           len(states), trainer.world_size)
            return
        self._pending_rng = states[trainer.global_rank]

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored here, after Lightning's own seeding/setup, right before the first batch.
        state = getattr(self, "_pending_rng", None)
        if state is not None:
            set_rng_states(state)
            self._pending_rng = None
        if trainer.ckpt_path is not None:
            # The step the run resumes at is saved already (it is the checkpoint). ModelCheckpoint
            # does not keep that in its state and would save this step again at the next batch
            # end: under gradient accumulation that is the first micro-batch, a mid-step state
            # written over the good step checkpoint and last.ckpt.
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint):
                    cb._last_global_step_saved = trainer.global_step
                    if trainer.is_global_zero:
                        _restore_step_checkpoint(cb, trainer)


def _restore_step_checkpoint(cb: ModelCheckpoint, trainer) -> None:
    """A kill while ModelCheckpoint wrote the step checkpoint the run resumes at (after
    ``last.ckpt`` of the same step was complete) leaves that step without its file, and the
    resumed run does not save the step again: copy the checkpoint it resumed from, which holds
    the same state, under the step checkpoint's name (keep-all step checkpoints only)."""
    from pathlib import Path

    from moshi_ttt.training.checkpointing import atomic_copy

    step, every = trainer.global_step, cb._every_n_train_steps
    source = Path(trainer.ckpt_path)
    if (not every or step == 0 or step % every or cb.save_top_k != -1 or not source.is_file() or cb.dirpath is None
            or source.parent.resolve() != Path(cb.dirpath).resolve()):  # only this run's own checkpoints
        return
    name = cb.format_checkpoint_name({"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(step)})
    target = Path(name)
    if target.exists() or target.resolve() == source.resolve():
        return
    atomic_copy(source, target)
    logger.info("step checkpoint %s was missing (a kill during its write): restored from %s", target.name, source.name)


class RunConfigCallback(L.Callback):
    """Puts the whole resolved run config (a plain dict) into every checkpoint as
    ``moshi_ttt_config``: export, serving and resume read how the model was built and trained
    from the checkpoint itself, not from a config file that may have changed since."""

    KEY = "moshi_ttt_config"

    def __init__(self, config: dict):
        if not isinstance(config, dict):
            raise TypeError(f"RunConfigCallback takes the resolved config as a plain dict, got {type(config)}")
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        import copy

        checkpoint[self.KEY] = copy.deepcopy(self.config)


class MetricsRowAtCheckpoint(L.Callback):
    """Writes the current step's CSV row when a checkpoint covering that step is saved.

    Lightning logs a step's row after every ``on_train_batch_end`` hook, where checkpoints are
    written: a hard kill in between would lose a row that no resumed run logs again (it starts
    after the checkpointed step). The early row holds what the step logged so far; Lightning's
    complete row follows under the same step, and readers merge rows by step.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from lightning.pytorch.loggers import CSVLogger

        connector = trainer._logger_connector
        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        if not csv_loggers or not trainer.training or connector._first_loop_iter is None or trainer._results is None:
            return
        # Only what this step has logged already (batch start, training_step, optimizer hooks): values
        # logged in on_train_batch_end hooks still hold the previous step's until Lightning logs them again.
        fresh = {m.meta.name for m in trainer._results.values()
                 if m.meta.fx in ("on_train_batch_start", "training_step", "on_before_backward", "on_after_backward",
                                  "on_before_optimizer_step", "optimizer_step")}
        row = {k: float(v) for k, v in connector.metrics["log"].items()
               if k in fresh and getattr(v, "numel", lambda: 1)() == 1}
        if not row:
            return
        row["epoch"] = trainer.current_epoch
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's own row will use
        for lg in csv_loggers:
            lg.log_metrics(row, step=step)
            lg.save()


class PlainProgressLogger(L.Callback):
    """Periodic one-line progress for non-interactive logs (SLURM), where bars are noise."""

    def __init__(self, every_n_steps: int = 10, force: bool = False):
        self.every = max(1, every_n_steps)
        self.force = force
        self._t0 = None

    def enabled(self) -> bool:
        return self.force or not sys.stdout.isatty()

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled() or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == getattr(self, "_last_step", None) or (step % self.every and step != trainer.max_steps):
            return  # one line per optimizer step, also under gradient accumulation
        self._last_step = step
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        for key in ("train/loss", "train/lr", "train/frames_per_s", "curriculum/stage"):
            if key in m:
                parts.append(f"{key.split('/')[-1]}={float(m[key]):.4g}")
        parts.append(f"elapsed={time.perf_counter() - self._t0:.1f}s")
        print(" | ".join(parts), flush=True)


class SampleLog(L.Callback):
    """Appends the key of every consumed training sample to ``<dir>/rank<r>.txt``: a data audit
    trail (which conversations a run saw, and that ranks never saw the same one)."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "key" not in batch:
            return
        import os

        os.makedirs(self.dirpath, exist_ok=True)
        with open(os.path.join(self.dirpath, f"rank{trainer.global_rank}.txt"), "a") as f:
            for key in batch["key"]:
                f.write(f"{trainer.global_step}\t{key}\n")


class TTTHealthLogger(L.Callback):
    """Logs every module's ``health()`` (TTT layers: fast-weight norm/mean/std, inner-lr stats,
    gate, output/input ratio) as ``ttt/<layer>/<stat>`` every ``every_n_steps`` steps."""

    def __init__(self, every_n_steps: int = 10):
        self.every = max(1, every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every or trainer.fit_loop._should_accumulate():
            return
        reported: list[str] = []
        for name, module in pl_module.model.named_modules():
            health = getattr(module, "health", None)
            # A TTT wrapper's health already includes its inner TTT layer's: report it once.
            if not callable(health) or any(name.startswith(prefix + ".") for prefix in reported):
                continue
            reported.append(name)
            for key, value in health().items():
                pl_module.log(f"ttt/{getattr(module, 'name', name)}/{key}", float(value), batch_size=1)
