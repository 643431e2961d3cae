"""The progressive curriculum (15 s -> 5 min -> 30 min): stages, their schedule, their switch.

Each stage is one Lightning "epoch" whose train loader yields exactly the stage's batches,
and loaders are rebuilt every epoch: the switch to the next sequence length is the epoch
boundary, the stage's gradient accumulation is set on the trainer as the stage starts
(``trainer.accumulate_grad_batches``), and the stage index and step-in-stage follow from the
global step, which the checkpoint already holds. A resume therefore lands in the same stage,
at the same step.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from torch import nn

from moshi_ttt.config.schema import Stage
from moshi_ttt.config.stages import parse_stages

logger = logging.getLogger(__name__)


@dataclass
class Curriculum:
    stages: list[Stage] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg) -> Curriculum:
        """Validated stages; errors name the offending key (``curriculum.stages.1.steps``)."""
        return cls(parse_stages(cfg.get("stages")))

    def __bool__(self) -> bool:
        return bool(self.stages)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def locate(self, global_step: int) -> tuple[int, int]:
        """(stage index, step inside that stage) for an optimizer step count."""
        start = 0
        for i, stage in enumerate(self.stages):
            if global_step < start + stage.steps:
                return i, global_step - start
            start += stage.steps
        return len(self.stages) - 1, self.stages[-1].steps

    def stage_of_epoch(self, epoch: int, global_step: int) -> tuple[int, int]:
        """(stage index, optimizer steps left in it) for Lightning's epoch ``epoch``.

        One stage is one epoch. Right after a stage's last step (a stage-end checkpoint) the
        global step already points at the next stage while Lightning is still finishing the
        stage's epoch: that epoch must see its own stage, with 0 steps left, or the restored
        epoch would be given the next stage's length and data.
        """
        start = sum(s.steps for s in self.stages[:epoch])
        if epoch < len(self.stages) and start <= global_step <= start + self.stages[epoch].steps:
            return epoch, start + self.stages[epoch].steps - global_step
        i, k = self.locate(global_step)  # epochs out of step with stages (older checkpoints)
        return i, self.stages[i].steps - k

    def lr_multiplier(self, global_step: int, base_lr: float) -> float:
        from moshi_ttt.training.module import warmup_cosine

        i, k = self.locate(global_step)
        stage = self.stages[i]
        peak = (stage.lr if stage.lr is not None else base_lr) / base_lr
        return peak * warmup_cosine(k, stage.warmup_steps, stage.steps, stage.min_lr_ratio)


def apply_stage_to_model(model: nn.Module, stage: Stage) -> int:
    """Tell every module that supports it (TTT layers, local attention) the stage's settings."""
    touched = 0
    for module in model.modules():
        configure = getattr(module, "configure_for_stage", None)
        if callable(configure):
            configure(ttt_mini_batch_size=stage.ttt_mini_batch_size, window=stage.attention_window)
            touched += 1
    return touched


class CurriculumCallback(L.Callback):
    """Applies each stage to the model, checkpoints at every stage end, logs the stage."""

    def __init__(self, curriculum: Curriculum, checkpoint_dir: str | None = None):
        self.curriculum = curriculum
        self.checkpoint_dir = checkpoint_dir
        self._announced: int | None = None  # the stage whose banner is logged (train and epoch start both enter)
        #: Resumed from the last stage's end before its validation: ``train`` runs it after ``fit``.
        self.final_validation_pending = False
        self._validate_on_start = False  # resumed from another stage's end: its validation runs at train start
        self._restart_val_count = False  # ... and the next stage's first batch resets the per-epoch validation count

    def _stage(self, trainer) -> tuple[int, Stage]:
        i, _ = self.curriculum.stage_of_epoch(trainer.current_epoch, trainer.global_step)
        return i, self.curriculum.stages[i]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Resume exactly from a checkpoint written right after a stage's last batch.

        Such a checkpoint (the stage-end one, a step or preemption checkpoint that falls on the
        stage end, ``last.ckpt`` at that moment) is written before the stage's validation and
        epoch end. Lightning restores it by closing the epoch and starting the next one, but
        decides whether the new epoch is "already full" by comparing the batches counted in the
        old stage with the length of the *next* stage's loader: stages of different lengths then
        start mid-way (a step replayed, the epoch counter off by one). Counting the next stage's
        length makes Lightning start the next stage cleanly; the validation the checkpoint
        preceded is run at train start (``_validate_finished_stage``). After the last stage
        Lightning has nothing left to run, so that validation is left to ``train`` once ``fit``
        returns (``final_validation_pending``).
        """
        fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        batches = fit.get("epoch_loop.batch_progress")
        ends = list(itertools.accumulate(s.steps for s in self.curriculum.stages))
        step = int(checkpoint.get("global_step", -1))
        if not batches or not batches.get("is_last_batch") or step not in ends:
            return
        before_validation = batches["total"]["completed"] == batches["total"]["processed"] - 1
        if step == ends[-1]:
            self.final_validation_pending = before_validation
            return
        if not before_validation:
            # Written after the batch (ModelCheckpoint re-saving last.ckpt after the validation, or
            # at epoch end without validation): restore it as the batch-end checkpoint of the step.
            for progress in (batches["total"], batches["current"]):
                progress["completed"] = progress["processed"] - 1
            for progress in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
                progress["processed"] = progress["completed"]
            fit.setdefault("epoch_loop.state_dict", {})["_batches_that_stepped"] = step - 1
        nxt = self.curriculum.stages[ends.index(step) + 1]
        n = nxt.steps * nxt.accumulate
        batches["current"] = {"ready": n, "started": n, "processed": n, "completed": n - 1}
        self._validate_on_start = True

    def _validate_finished_stage(self, trainer) -> None:
        """Run the validation that the restored checkpoint was written before (logged at its step)."""
        from lightning.pytorch.callbacks import Checkpoint
        from lightning.pytorch.trainer import call

        loop = trainer.fit_loop.epoch_loop.val_loop
        if not trainer.enable_validation:
            return
        # The run is at its checkpoint already: a checkpoint callback must not save again here
        # (ModelCheckpoint would re-save last.ckpt in the middle of this restore).
        callbacks = trainer.callbacks
        trainer.callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        first = trainer._logger_connector._first_loop_iter
        epoch = trainer.fit_loop.epoch_progress.current
        epoch.completed -= 1  # Lightning already counts the finished stage's epoch: log under it, as it was
        trainer.validating = True
        loop.restarting = False
        try:
            call._call_lightning_module_hook(trainer, "on_validation_model_zero_grad")
            loop.run()
        finally:
            trainer.callbacks = callbacks
            epoch.completed += 1
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning skips on_train_epoch_start when it resumes mid-epoch: apply the stage here too.
        self._enter_stage(trainer, pl_module)
        if self._validate_on_start:
            self._validate_on_start = False
            # Lightning closed the finished stage's epoch while restoring and goes on as if it
            # were mid-way through the next one, so it will not count that epoch as ready and
            # started: count it here, or every later checkpoint's epoch counters are one behind
            # an uninterrupted run's (and a resume from them logs under the wrong epoch).
            trainer.fit_loop.epoch_progress.increment_ready()
            trainer.fit_loop.epoch_progress.increment_started()
            self._validate_finished_stage(trainer)
            self._restart_val_count = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restart_val_count:
            # The validations counted per epoch: the restored stage's first batch (still "restarting"
            # for Lightning) fast-forwarded them to the end; the new stage has run none yet.
            self._restart_val_count = False
            trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.reset()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._enter_stage(trainer, pl_module)

    def _enter_stage(self, trainer, pl_module) -> None:
        i, stage = self._stage(trainer)
        trainer.accumulate_grad_batches = stage.accumulate
        n = apply_stage_to_model(pl_module.model, stage)
        if trainer.is_global_zero and i != self._announced:
            self._announced = i
            logger.info("curriculum stage %d/%d '%s': %d frames (%.0f s), %d steps, batch %d x accumulate %d%s",
                        i + 1, len(self.curriculum.stages), stage.name, stage.frames, stage.seconds, stage.steps,
                        stage.batch_size, stage.accumulate, f", {n} module(s) reconfigured" if n else "")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        i, k = self.curriculum.locate(max(trainer.global_step - 1, 0))
        pl_module.log("curriculum/stage", float(i), batch_size=1)
        pl_module.log("curriculum/step_in_stage", float(k + 1), batch_size=1)
        stage = self.curriculum.stages[i]
        if self.checkpoint_dir is None or trainer.fit_loop._should_accumulate() or k + 1 != stage.steps:
            return
        # The stage-end checkpoint is written here, after the stage's last optimizer step, and
        # not at on_train_epoch_end: Lightning restores a batch-end checkpoint exactly (it then
        # runs the stage's validation and moves to the next epoch), while an epoch-end one
        # restarts with half-advanced epoch counters (one step replayed, validation skipped).
        path = Path(self.checkpoint_dir) / f"stage{i}-{stage.name}-end.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        trainer.save_checkpoint(Path(self.checkpoint_dir) / "last.ckpt", weights_only=False)
        if trainer.is_global_zero:
            logger.info("curriculum stage '%s' done at step %d: %s", stage.name, trainer.global_step, path)
