"""Lightning's DeepSpeedStrategy, plus CPU support (for tests) and atomic checkpoint directories.

On CUDA it is Lightning's strategy unchanged, except that a checkpoint directory is written
under a temporary name and renamed once every rank has finished, so a preemption during a
save never leaves a half-written ``last.ckpt`` behind. On a CPU accelerator (tests and
laptops; Lightning refuses it) three methods change: the CUDA check is skipped, the
device-index validation is skipped (CPU devices have no index), and DeepSpeed gets the local
rank as its device rank.
"""

from __future__ import annotations

import argparse
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


class MoshiDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "moshi_deepspeed"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("exclude_frozen_parameters", True)  # the frozen base is reloaded from its source
        if "config" in kwargs:
            kwargs["config"] = _plain(kwargs["config"])
        super().__init__(*args, **kwargs)

    @contextmanager
    def model_sharded_context(self):
        """Build the model whole, not under ``zero.Init``: the frozen base is loaded from its
        checkpoint and the adapters are initialised (LoRA B = 0, gates) on full tensors;
        ``deepspeed.initialize`` partitions it afterwards (the 7B costs ~15 GB host RAM per rank)."""
        yield

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu:
            DDPStrategy.setup_environment(self)
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo" if self._on_cpu else super()._get_process_group_backend()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        filepath = Path(self.broadcast(str(filepath)))
        tmp = filepath.with_name(f".{filepath.name}.tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("moshi_ttt_ds_ckpt_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("moshi_ttt_ds_ckpt_written")
        if self.is_global_zero:
            # Directories cannot be swapped atomically: keep the previous one as ``.NAME.old``
            # until the new one is in place (resolve_ckpt_path falls back to it).
            old = previous_checkpoint(filepath)
            if old.exists():
                shutil.rmtree(old)
            if filepath.exists():
                os.replace(filepath, old)
            os.replace(tmp, filepath)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("moshi_ttt_ds_ckpt_renamed")

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero and os.path.isdir(filepath):
            shutil.rmtree(filepath)
        elif self.is_global_zero and os.path.exists(filepath):
            os.remove(filepath)


def previous_checkpoint(filepath) -> Path:
    filepath = Path(filepath)
    return filepath.with_name(f".{filepath.name}.old")


def _plain(obj):
    """OmegaConf containers -> plain dicts/lists (DeepSpeed serialises its config as JSON)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
