"""Moshi's fine-tuning loss against a direct per-position computation."""

from __future__ import annotations

import math

import torch

from moshi_ttt.models import MoshiSourceConfig, load_base_moshi
from moshi_ttt.training.loss import LossConfig, moshi_loss


def _naive(out, codes, cfg, pads):
    num = den = 0.0
    B, _, T = codes.shape
    for b in range(B):
        for t in range(T):
            if out.text_mask[b, 0, t] and codes[b, 0, t] >= 0:
                w = cfg.text_padding_weight if int(codes[b, 0, t]) in pads else 1.0
                ce = -torch.log_softmax(out.text_logits[b, 0, t].double(), -1)[codes[b, 0, t]]
                num, den = num + w * ce, den + w
    text = num / den
    num = den = 0.0
    for b in range(B):
        for k in range(out.logits.shape[1]):
            for t in range(T):
                tgt = codes[b, 1 + k, t]
                if out.mask[b, k, t] and tgt >= 0:
                    w = cfg.first_codebook_weight if k == 0 else 1.0
                    ce = -torch.log_softmax(out.logits[b, k, t].double(), -1)[tgt]
                    num, den = num + w * ce, den + w
    return text, num / den


def test_loss_matches_naive_and_ignores_invalid_positions(tiny_lm_kwargs):
    model = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=0))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (2, 17, 10), generator=g)
    codes[:, 0, ::3] = 3  # text padding
    codes[1, :, 7:] = -1  # padded tail of a short conversation
    with torch.no_grad():
        out = model(codes)
    assert torch.isnan(out.logits).any()  # moshi marks invalid (delayed) positions with NaN
    cfg = LossConfig(text_padding_weight=0.5, first_codebook_weight=100.0)
    res = moshi_loss(out, codes, cfg, (3, 0))
    text, audio = _naive(out, codes, cfg, (3, 0))
    assert math.isfinite(float(res.loss))
    assert abs(float(res.text_loss) - float(text)) < 1e-5
    assert abs(float(res.audio_loss) - float(audio)) < 1e-5
    assert abs(float(res.loss) - float(text + audio)) < 1e-5
    assert res.per_codebook.shape == (8,)
    assert res.token_counts[1, 7:].sum() == 0  # padded frames contribute nothing


def test_loss_gradients_are_finite(tiny_lm_kwargs):
    model = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=1))
    for p in model.parameters():
        p.requires_grad_(True)
    codes = torch.randint(0, 64, (1, 17, 8))
    res = moshi_loss(model(codes), codes, LossConfig(), (3, 0))
    res.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
