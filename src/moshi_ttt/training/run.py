"""``train(cfg)``: everything ``python train.py`` does, callable without Hydra's main."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from moshi_ttt.config.groups import ttt_dict
from moshi_ttt.config.validate import validate_config
from moshi_ttt.models.build import build_model
from moshi_ttt.models.segments import release_segments
from moshi_ttt.training.callbacks import MetricsRowAtCheckpoint, RunConfigCallback
from moshi_ttt.training.checkpointing import AtomicCheckpointIO
from moshi_ttt.training.cpu_runtime import tune_cpu_runtime
from moshi_ttt.training.curriculum import Curriculum, CurriculumCallback
from moshi_ttt.training.deepspeed_strategy import previous_checkpoint
from moshi_ttt.training.loss import LossConfig
from moshi_ttt.training.module import MoshiTTTModule, OptimConfig
from moshi_ttt.training.preemption import Preempted, PreemptionCallback, requeue_if_preempted
from moshi_ttt.training.resume_config import check_resume_config
from moshi_ttt.training.rundir import (
    RunLock,
    is_launching_process,
    load_checkpoint_file,
    name_multirun_job,
    newest_loadable_checkpoint,
    remove_temp_files,
)

logger = logging.getLogger("moshi_ttt")

def find_resume_checkpoint(ckpt_path: str | None, run_dir: str | os.PathLike) -> tuple[str | None, dict | None]:
    """(checkpoint to resume from, its contents), or (None, None) to start fresh.

    ``last`` takes ``last.ckpt``, else (missing or damaged: a kill during its first write, a
    truncated copy) the newest checkpoint of the run that loads; an explicit path must load.
    """
    if ckpt_path in (None, "", "none", "null"):
        return None, None
    if ckpt_path == "last":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        # .old: a DeepSpeed save was cut short
        found = newest_loadable_checkpoint([last, previous_checkpoint(last)], last.parent)
        if found is None:
            logger.info("no checkpoint at %s: starting fresh", last)
            return None, None
        path, content = found
    else:
        path = Path(ckpt_path)
        if not path.exists():
            logger.info("ckpt_path=%s does not exist yet: starting fresh", ckpt_path)
            return None, None
        try:
            content = load_checkpoint_file(path)
        except Exception as exn:  # noqa: BLE001 - named for the user, whatever the reader raised
            raise ValueError(f"ckpt_path={ckpt_path} cannot be loaded ({type(exn).__name__}: {exn})") from exn
    logger.info("resuming from %s", path)
    return str(path), content


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | os.PathLike) -> str | None:
    return find_resume_checkpoint(ckpt_path, run_dir)[0]


def _quiet_expected_warnings() -> None:
    import warnings

    # The frozen base is kept in eval mode on purpose (no dropout/batch statistics to update).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Validation is optional: an empty val loader list is the "no validation" setting.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    # Checkpoints are per run directory by design: resuming writes into the same directory.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Mid-stage resume is exact: the data position lives in the DataModule's checkpoint state,
    # not in the loader object Lightning inspects.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    logging.getLogger("moshi_ttt").setLevel(logging.INFO)


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as the run records it (config.yaml, checkpoints, loggers): ``ttt``
    under its current names only, without the deprecated fields the schema keeps (null) so
    that old names still parse."""
    out = OmegaConf.to_container(cfg, resolve=True)
    if out.get("ttt") is not None:
        out["ttt"] = ttt_dict(out["ttt"])
    return out


def build_curriculum(cfg: DictConfig) -> Curriculum:
    if cfg.get("curriculum") is None:
        return Curriculum([])
    return Curriculum.from_config(OmegaConf.to_container(cfg.curriculum, resolve=True))


def build_trainer(cfg: DictConfig, curriculum: Curriculum | None = None, recorded: dict | None = None,
                  **overrides) -> L.Trainer:
    """``recorded``: the config checkpoints carry (``recorded_config(cfg)`` when not given)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    interactive = sys.stdout.isatty()
    if interactive:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # PreemptionCallback owns requeue; Lightning's own handler would requeue a second time.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    callbacks += [RunConfigCallback(recorded if recorded is not None else recorded_config(cfg)),
                  MetricsRowAtCheckpoint()]
    kwargs = dict(callbacks=callbacks, logger=loggers or False, plugins=plugins, enable_progress_bar=interactive)
    if curriculum:
        # One stage = one epoch with its own loader; accumulation follows the stage.
        callbacks.append(CurriculumCallback(curriculum, str(Path(cfg.paths.run_dir) / "checkpoints")))
        kwargs.update(max_steps=curriculum.total_steps, max_epochs=-1, reload_dataloaders_every_n_epochs=1,
                      val_check_interval=None, check_val_every_n_epoch=1, accumulate_grad_batches=1)
    # Preemption acts last at a batch end (after the step's checkpoints), see PreemptionCallback.
    callbacks.sort(key=lambda c: isinstance(c, PreemptionCallback))
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)


def build_module(cfg: DictConfig, curriculum: Curriculum | None = None) -> MoshiTTTModule:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ttt_cfg = OmegaConf.to_container(cfg.ttt, resolve=True) if cfg.get("ttt") is not None else None
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim["betas"] = tuple(optim["betas"])
    return MoshiTTTModule(
        functools.partial(build_model, model_cfg, ttt_cfg),
        loss=LossConfig(**OmegaConf.to_container(cfg.loss, resolve=True)),  # the module types loss.distill
        optim=OptimConfig(**optim),
        curriculum=curriculum,
    )


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close the W&B run so its offline file is complete (``wandb sync``-able) when train returns."""
    from lightning.pytorch.loggers import WandbLogger

    if trainer.is_global_zero and any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        import wandb

        wandb.finish()


def _run_pending_final_validation(trainer: L.Trainer, module, datamodule) -> None:
    """A run resumed from its last step's checkpoint, written before the final validation (a
    node lost in between), has no step left for Lightning to run: validate here, logged at the
    last step as an uninterrupted run logs it."""
    cb = next((c for c in trainer.callbacks if isinstance(c, CurriculumCallback)), None)
    if cb is None or not cb.final_validation_pending or not trainer.enable_validation:
        return
    cb.final_validation_pending = False
    logger.info("running the final validation that the resumed checkpoint was written before")
    trainer.validate(module, datamodule=datamodule, verbose=False)


def train(cfg: DictConfig) -> dict:
    """Validate, build, fit (resuming when a checkpoint exists); returns a summary."""
    _setup_logging()
    _quiet_expected_warnings()
    name_multirun_job(cfg)
    validate_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    curriculum = build_curriculum(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.curriculum = curriculum
    datamodule.validate()
    # One live run per run directory: the launching process holds the lock until fit returns.
    lock = RunLock(run_dir).acquire() if is_launching_process() else None
    try:
        summary, trainer = _train(cfg, run_dir, curriculum, datamodule, owner=lock is not None)
    finally:
        if lock is not None:
            lock.release()
    requeue_if_preempted(trainer)  # last: Slurm ends the process as it requeues the job
    return summary


def _train(cfg: DictConfig, run_dir: Path, curriculum: Curriculum, datamodule, owner: bool) -> tuple[dict, L.Trainer]:
    if owner:
        remove_temp_files(run_dir / "checkpoints")
    recorded = recorded_config(cfg)
    ckpt, content = find_resume_checkpoint(cfg.ckpt_path, run_dir)
    if content is not None:
        check_resume_config(content, recorded, ckpt,
                            bool(OmegaConf.select(cfg, "resume.allow_config_change", default=False)))
        del content

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    tune_cpu_runtime(cpu_training=OmegaConf.select(cfg, "trainer.accelerator") == "cpu")
    module = build_module(cfg, curriculum)
    trainer = build_trainer(cfg, curriculum, recorded)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(recorded))
        for lg in trainer.loggers:
            lg.log_hyperparams(recorded)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except Preempted as stop:
        release_segments()  # the step's batch-end hooks after the preemption's did not run
        logger.warning("%s; the rerun of this command resumes from it", stop)
    else:
        _run_pending_final_validation(trainer, module, datamodule)
    _finish_wandb(trainer)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    summary = {
        "run_dir": str(run_dir),
        "global_step": trainer.global_step,
        "resumed_from": ckpt,
        "metrics": metrics,
        "checkpoint_dir": str(run_dir / "checkpoints"),
        "param_counts": getattr(module, "param_counts", None),
    }
    if trainer.is_global_zero:
        logger.info("done: %d steps, train/loss %.4f, checkpoints in %s", trainer.global_step,
                    metrics.get("train/loss", float("nan")), summary["checkpoint_dir"])
        print(format_summary(summary, curriculum), flush=True)
    return summary, trainer


def format_summary(summary: dict, curriculum: Curriculum | None = None) -> str:
    """What the run did and where its outputs are, for the end of a log."""
    from moshi_ttt.training.metrics_io import read_csv_metrics
    from moshi_ttt.training.wandb_offline import find_offline_runs

    run_dir = Path(summary["run_dir"])
    lines = ["", "=" * 72, f"moshi-ttt run '{run_dir.name}': {summary['global_step']} optimizer steps"
             + (f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else "")]
    counts = summary.get("param_counts") or {}
    if counts:
        lines.append(f"  parameters: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen")
    loss = read_csv_metrics(run_dir).get("train/loss", {})
    if curriculum:
        start = 0
        for stage in curriculum.stages:
            steps = [s for s in loss if start <= s < start + stage.steps]
            if steps:
                lines.append(f"  stage {stage.name:>8}: {stage.frames:>6} frames x {stage.steps} steps, train/loss "
                             f"{loss[min(steps)]:.3f} -> {loss[max(steps)]:.3f}")
            start += stage.steps
    elif loss:
        lines.append(f"  train/loss {loss[min(loss)]:.3f} (step {min(loss)}) -> {loss[max(loss)]:.3f} (step {max(loss)})")
    val = {k: v for k, v in summary["metrics"].items() if k.startswith("val/") and k.endswith("loss")}
    if "val/loss" in val:
        lines.append(f"  val/loss {val['val/loss']:.3f}")
    lines += [f"  run directory : {run_dir}", f"  checkpoints   : {summary['checkpoint_dir']}",
              f"  metrics (CSV) : {run_dir / 'csv'}", f"  config        : {run_dir / 'config.yaml'}"]
    for wb in find_offline_runs(run_dir):
        lines.append(f"  W&B (offline): wandb sync {wb.parent}")
    lines.append("=" * 72)
    return "\n".join(lines)
