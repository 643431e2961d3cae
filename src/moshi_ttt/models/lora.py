"""LoRA on the frozen base through moshi's own LoRALinear, kept as a product option."""

from __future__ import annotations

import torch
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora


def apply_lora(model: torch.nn.Module, rank: int, scaling: float = 2.0, modules: str = "transformer") -> int:
    """Wrap linears with LoRA; returns the number of wrapped layers.

    ``modules`` is ``transformer`` (the temporal transformer only, where long context lives)
    or ``all``. B starts at zero so the adapted model starts exactly at the base model.
    """
    if rank <= 0:
        return 0
    targets = {"transformer": [model.transformer], "all": [model]}
    if modules not in targets:
        raise ValueError(f"model.lora.modules={modules!r} must be 'transformer' or 'all'")
    for target in targets[modules]:
        replace_all_linear_with_lora(target, rank, scaling)
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in wrapped:
        m.frozen_W.weight.requires_grad_(False)
        for p in (m.lora_A.weight, m.lora_B.weight):
            p.requires_grad_(True)
        with torch.no_grad():
            m.lora_B.weight.zero_()
    return len(wrapped)
