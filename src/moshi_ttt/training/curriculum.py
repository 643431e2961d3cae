"""The progressive curriculum (15 s -> 5 min -> 30 min): stages, their schedule, their switch.

Each stage is one Lightning "epoch" whose train loader yields exactly the stage's batches,
and loaders are rebuilt every epoch: the switch to the next sequence length is the epoch
boundary, the stage's gradient accumulation is set on the trainer as the stage starts
(``trainer.accumulate_grad_batches``), and the stage index and step-in-stage follow from the
global step, which the checkpoint already holds. A resume therefore lands in the same stage,
at the same step.
"""

from __future__ import annotations

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

    def _stage(self, trainer) -> tuple[int, Stage]:
        i, _ = self.curriculum.locate(trainer.global_step)
        return i, self.curriculum.stages[i]

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning skips on_train_epoch_start when it resumes mid-epoch: apply the stage here too.
        self._enter_stage(trainer, pl_module)

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

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.checkpoint_dir is None:
            return
        i, k = self.curriculum.locate(max(trainer.global_step - 1, 0))
        stage = self.curriculum.stages[i]
        if k + 1 != stage.steps:
            return  # the epoch ended early (max_steps / interruption), not at the stage's end
        path = Path(self.checkpoint_dir) / f"stage{i}-{stage.name}-end.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        trainer.save_checkpoint(Path(self.checkpoint_dir) / "last.ckpt", weights_only=False)
        if trainer.is_global_zero:
            logger.info("curriculum stage '%s' done at step %d: %s", stage.name, trainer.global_step, path)
