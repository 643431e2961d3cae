"""LightningModule, DataModule, callbacks, checkpoints and the ``train(cfg)`` entry point."""

from moshi_ttt.training.run import build_module, build_trainer, resolve_ckpt_path, train, validate_config

__all__ = ["build_module", "build_trainer", "resolve_ckpt_path", "train", "validate_config"]
