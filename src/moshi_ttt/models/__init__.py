"""Loading frozen Moshi and inserting the trainable adapters (LoRA, TTT variants) into it."""

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
    "MoshiSourceConfig",
    "apply_lora",
    "count_parameters",
    "freeze",
    "load_base_moshi",
    "locate_checkpoint",
    "save_base_checkpoint",
]
