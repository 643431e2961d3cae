"""Moshi's fine-tuning loss: text CE with padding down-weighted + audio CE with the semantic
codebook up-weighted, as moshi-finetune computes it, so that numbers compare."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMOutput

from moshi_ttt.config.schema import LossConfig  # the schema is the one definition


@dataclass
class LossOutput:
    loss: torch.Tensor
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    per_codebook: torch.Tensor  # [dep_q] unweighted CE per audio codebook
    token_losses: torch.Tensor  # [B, T] unweighted CE summed over valid streams (for position buckets)
    token_counts: torch.Tensor  # [B, T] number of valid streams per frame


def _weighted_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor):
    """CE over valid positions only: NaN logits at invalid positions never reach the loss."""
    ce = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    ce[mask] = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    w = weights * mask
    return (ce * w).sum() / w.sum().clamp_min(1e-9), ce


@dataclass
class PositionWeights:
    """Targets, valid positions and per-position weights of Moshi's loss (the distillation loss
    weights its positions the same way)."""

    text_targets: torch.Tensor  # [B, 1, T], padding (< 0) clamped to 0
    text_mask: torch.Tensor  # [B, 1, T]
    text_weights: torch.Tensor  # [B, 1, T] float32
    audio_targets: torch.Tensor  # [B, dep_q, T]
    audio_mask: torch.Tensor  # [B, dep_q, T]
    audio_weights: torch.Tensor  # [B, dep_q, T] float32


def position_weights(out: LMOutput, codes: torch.Tensor, cfg: LossConfig, text_padding_ids: tuple[int, ...],
                     audio_offset: int = 1) -> PositionWeights:
    """Text positions whose target is padding weigh ``text_padding_weight``, the first audio
    codebook ``first_codebook_weight``; positions invalid for the model or padded (< 0) are masked."""
    dep_q = out.logits.shape[1]
    text_targets = codes[:, :1]
    text_mask = out.text_mask & (text_targets >= 0)
    text_w = torch.ones_like(text_targets, dtype=torch.float32)
    for pad in text_padding_ids:
        text_w = torch.where(text_targets == pad, text_w * cfg.text_padding_weight, text_w)
    audio_targets = codes[:, audio_offset : audio_offset + dep_q]
    audio_mask = out.mask & (audio_targets >= 0)
    audio_w = torch.ones_like(audio_targets, dtype=torch.float32)
    audio_w[:, 0] *= cfg.first_codebook_weight
    return PositionWeights(text_targets.clamp_min(0), text_mask, text_w, audio_targets.clamp_min(0), audio_mask,
                           audio_w)


def moshi_loss(out: LMOutput, codes: torch.Tensor, cfg: LossConfig, text_padding_ids: tuple[int, ...],
               audio_offset: int = 1) -> LossOutput:
    """``codes`` [B, 17, T] as fed to ``LMModel.forward``; invalid/padded positions masked."""
    w = position_weights(out, codes, cfg, text_padding_ids, audio_offset)
    text_loss, text_ce = _weighted_ce(out.text_logits, w.text_targets, w.text_mask, w.text_weights)
    audio_loss, audio_ce = _weighted_ce(out.logits, w.audio_targets, w.audio_mask, w.audio_weights)
    text_mask, audio_mask = w.text_mask, w.audio_mask

    counts = audio_mask.sum(dim=(0, 2)).clamp_min(1)
    per_codebook = (audio_ce * audio_mask).sum(dim=(0, 2)) / counts
    token_losses = (audio_ce * audio_mask).sum(1) + (text_ce * text_mask).sum(1)
    token_counts = audio_mask.sum(1) + text_mask.sum(1)
    loss = cfg.text_weight * text_loss
    if cfg.audio_weight:  # at 0 the audio logits stay metrics: no backward through the depformer (the same loss)
        loss = loss + cfg.audio_weight * audio_loss
    return LossOutput(loss, text_loss, audio_loss, per_codebook.detach(), token_losses.detach(),
                      token_counts.detach())
