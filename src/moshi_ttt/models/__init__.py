"""Loading frozen Moshi and inserting the trainable adapters (LoRA, TTT variants) into it."""

from moshi_ttt.models.build import build_model, load_exported
from moshi_ttt.models.insert import install_ttt, set_ttt_enabled
from moshi_ttt.models.loading import (
    MoshiSourceConfig,
    count_parameters,
    freeze,
    load_base_moshi,
    locate_checkpoint,
    save_base_checkpoint,
)
from moshi_ttt.models.lora import apply_lora

__all__ = [
    "build_model",
    "install_ttt",
    "load_exported",
    "set_ttt_enabled",
    "MoshiSourceConfig",
    "apply_lora",
    "count_parameters",
    "freeze",
    "load_base_moshi",
    "locate_checkpoint",
    "save_base_checkpoint",
]
