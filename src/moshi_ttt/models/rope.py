"""RoPE position interpolation for the temporal transformer.

A model trained with attention distances up to C frames meets unseen rotation angles when it is
asked to relate frames further apart. Position interpolation (Chen et al., 2023) divides every
position by a scale s, so s * C frames span the angles of C; fine-tuning then adapts the model
to the finer spacing. ``install_position_scale`` converts moshi's shared ``RotaryEmbedding`` in
place (the transformer and every attention module hold the same object), so training, the local
attention, the kv_slots keys and LMGen's streaming offsets all see the same scaled positions.
With s = 1 it is moshi's own rotation, bit for bit.
"""

from __future__ import annotations

import math

import torch
from moshi.modules.rope import RotaryEmbedding
from torch import nn


def rotate(x: torch.Tensor, positions: torch.Tensor, max_period: float, interleave: bool) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] (or [B, T, H, D] with positions shaped to broadcast) by RoPE
    at fractional ``positions`` (broadcastable to x without the last dim), in fp32."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {D}")
    freqs = torch.exp(torch.arange(D // 2, device=x.device, dtype=torch.float32) * (-math.log(max_period) * 2 / D))
    angle = positions.to(torch.float32)[..., None] * freqs
    cos, sin = torch.cos(angle), torch.sin(angle)
    if interleave:
        pairs = x.unflatten(-1, (D // 2, 2)).float()
        re, im = pairs[..., 0], pairs[..., 1]
        out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    else:
        re, im = x[..., : D // 2].float(), x[..., D // 2 :].float()
        out = torch.cat([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.to(x.dtype)


class ScaledRotaryEmbedding(RotaryEmbedding):
    """moshi's RotaryEmbedding with positions divided by ``position_scale``."""

    position_scale: float

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, time_before_heads: bool = False):
        if self.position_scale == 1.0:
            return super().forward(q, k, offset, time_before_heads)
        T = q.shape[1] if time_before_heads else q.shape[2]
        pos = (offset.to(torch.float32).view(-1, 1) + torch.arange(T, device=q.device, dtype=torch.float32))
        pos = pos / self.position_scale  # [B, T]
        pos = pos[:, :, None] if time_before_heads else pos[:, None, :]
        return (rotate(q, pos, self.max_period, self.interleave),
                rotate(k, pos, self.max_period, self.interleave))


def install_position_scale(transformer: nn.Module, scale: float) -> RotaryEmbedding:
    """Set the interpolation scale of ``transformer.rope`` (moshi's StreamingTransformer), in place."""
    rope = getattr(transformer, "rope", None)
    if rope is None:
        raise ValueError("ttt.rope_position_scale is set but the model has no RoPE "
                         "(lm_kwargs.positional_embedding must be rope)")
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"ttt.rope_position_scale={scale!r} must be a positive number (1 = no interpolation)")
    if not isinstance(rope, ScaledRotaryEmbedding):
        rope.__class__ = ScaledRotaryEmbedding
    rope.position_scale = float(scale)
    return rope
