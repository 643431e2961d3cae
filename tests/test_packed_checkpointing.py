"""Packed batches under moshi's activation checkpointing: the conversation boundaries reach the
forward and its recomputation inside backward, so loss and gradients equal the plain run.

This was the flagship recipe's crash (``CheckpointError: A different number of tensors was
saved``) at the first packed curriculum stage with ``model.gradient_checkpointing=true``.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from moshi_ttt.models import MoshiSourceConfig, load_base_moshi
from moshi_ttt.models.insert import install_ttt
from moshi_ttt.models.segments import bind_segments, current_segments, release_segments
from moshi_ttt.training.loss import LossConfig, moshi_loss

VARIANTS = ["pre_attention", "post_attention", "hybrid", "cache_replacement", "cache_replacement:kv_slots"]


def _model(kw, variant: str):
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs={**kw, "context": 64}, seed=0))
    variant, _, read = variant.partition(":")
    install_ttt(base, {"variant": variant, "layer_indices": [0, -1], "ttt_layer_attention_window": 8, "memory_read": read or "add",
                       "ttt_layer": {}})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open every gate and projection so the memory changes the outputs
        for name, p in base.named_parameters():
            if p.requires_grad and "token_bias" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base


def _packed_batch(kw, B=2, T=40):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, kw["card"], (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, kw["text_card"], (B, T), generator=g)
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[0, 13:] = 1  # sample 0 joins three conversations, sample 1 two
    segments[0, 29:] = 2
    segments[1, 22:] = 1
    return codes, segments


def _step(model, codes, segments):
    """What the LightningModule's training step does: bind, forward, loss, backward, release."""
    model.zero_grad(set_to_none=True)
    bind_segments(segments)
    try:
        out = model(codes)
        loss = moshi_loss(out, codes, LossConfig(), (model.text_padding_token_id, model.end_of_text_padding_id),
                          model.audio_offset).loss
        loss.backward()
    finally:
        release_segments()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_loss_and_gradients_equal_with_activation_checkpointing(tiny_lm_kwargs, variant):
    plain = _model(tiny_lm_kwargs, variant)
    ckpt = copy.deepcopy(plain)
    ckpt.transformer.checkpointing = True
    ckpt.depformer.checkpointing = True
    codes, segments = _packed_batch(tiny_lm_kwargs)

    loss_a, grads_a = _step(plain, codes, segments)
    loss_b, grads_b = _step(ckpt, codes, segments)
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)

    # The boundaries did something: the same batch read as one conversation gives another loss.
    loss_joined, _ = _step(plain, codes, None)
    assert not torch.allclose(loss_a, loss_joined, atol=1e-4)


def test_bound_segments_are_seen_from_other_threads_and_released():
    # CUDA runs backward (and so the recomputation) on the autograd engine's own threads.
    seg = torch.tensor([[0, 0, 1, 1]])
    seen = []
    bind_segments(seg)
    try:
        t = threading.Thread(target=lambda: seen.append(current_segments()))
        t.start()
        t.join()
    finally:
        release_segments()
    assert seen[0] is seg
    assert current_segments() is None
