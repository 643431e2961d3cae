"""Each memory variant recalls beyond its attention window: a toy a few hundred steps long.

A tiny Moshi with an 8-frame window first learns the lookup inside its window (two key/value
pairs, ``PairsRecallSpec``: each value's frame carries its key in the user's audio), then is
frozen; the pairs are then asked again 24+ frames later and only the TTT parameters train, on
the values' cross-entropy. Each variant is the product's config (``ttt=<variant>``: the memory's
defaults, no memory setting of this test's own), with only its layers and window sized to the toy.
Attention cannot see the pairs, so whatever beats chance went through the memory; the frozen
base is the control. The full measurement (4x to 16x the window, 4 and 8 pairs, an oracle,
several seeds) is ``make memory-proof``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moshi_ttt.data.recall import PairsRecallSpec, pairs_recall_sample

WINDOW, STEPS, BASE_STEPS = 8, 300, 400
SPEC = PairsRecallSpec(gaps=(24,), pairs=(2,), key_in_audio=True)
INSIDE = [PairsRecallSpec(gaps=(g,), pairs=(2,), key_in_audio=True) for g in (0, 1, 2)]  # reach <= 7 frames
CHANCE = 1 / len(SPEC.value_ids)


def _batch(rng: np.random.Generator, n: int, spec: PairsRecallSpec = SPEC) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [pairs_recall_sample(rng, spec) for _ in range(n)]
    codes = torch.stack([torch.from_numpy(c.astype(np.int64)) for c, _ in samples])
    return codes, torch.tensor([m["recall_frames"] for _, m in samples])


def _values_loss_and_recall(model, codes: torch.Tensor, frames: torch.Tensor):
    logits = model(codes).text_logits[:, 0]  # [B, T, text_card]
    picked = torch.gather(logits, 1, frames[..., None].expand(-1, -1, logits.shape[-1]))
    target = torch.gather(codes[:, 0], 1, frames)
    loss = torch.nn.functional.cross_entropy(picked.flatten(0, 1), target.flatten())
    return loss, (picked.argmax(-1) == target).float().mean().item()


@pytest.fixture(scope="module")
def frozen_base(tiny_lm_kwargs):
    """The tiny Moshi after it learned the lookup inside its window (~10 s), frozen."""
    from moshi_ttt.models import MoshiSourceConfig, load_base_moshi

    torch.manual_seed(0)
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs={**tiny_lm_kwargs, "context": WINDOW}, seed=0))
    base.requires_grad_(True)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    rng = np.random.default_rng(5)
    base.train()
    for step in range(BASE_STEPS):
        loss, _ = _values_loss_and_recall(base, *_batch(rng, 32, INSIDE[step % len(INSIDE)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.requires_grad_(False)
    return base.eval()


@pytest.mark.slow
def test_base_recalls_inside_its_window(frozen_base):
    with torch.no_grad():
        assert _values_loss_and_recall(frozen_base, *_batch(np.random.default_rng(98), 128, INSIDE[2]))[1] > 0.9


def _trained_recall(base, ttt: dict | None) -> float:
    from moshi_ttt.models.insert import install_ttt

    torch.manual_seed(0)
    model = copy.deepcopy(base)
    install_ttt(model, ttt)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if ttt is not None:
        assert trainable, "the variant added nothing to train"
        opt = torch.optim.Adam(trainable, lr=3e-3)
        rng = np.random.default_rng(1)
        model.train()
        for _ in range(STEPS):
            loss, _ = _values_loss_and_recall(model, *_batch(rng, 16))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return _values_loss_and_recall(model, *_batch(np.random.default_rng(99), 128))[1]


def _ttt(option: str) -> dict:
    """The product's ``ttt=<option>`` with the toy's sizes: its layers and windows."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moshi_ttt.config.groups import ttt_settings
    from moshi_ttt.memory_proof import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        ttt = compose("train", overrides=[f"ttt={option}"]).ttt
    b = ttt_settings(ttt).ttt_layer.resolved().mini_batch_size  # one frame per write: the delta rule
    # cache_replacement attends over (ceil(W / b) + 1) * b frames: W - b keeps the base's window
    window = WINDOW - b if ttt.variant == "cache_replacement" else WINDOW
    return {**OmegaConf.to_container(ttt, resolve=True), "layer_indices": [0, -1], "ttt_layer_attention_window": window,
            "attention_window": WINDOW}


def test_the_pairs_are_beyond_the_window():
    codes, frames = _batch(np.random.default_rng(0), 4)
    assert int(frames.min()) - (1 + 2 * max(SPEC.pairs)) >= 3 * WINDOW  # every query is 24+ frames after its pair


@pytest.mark.slow
def test_frozen_base_cannot_recall_beyond_its_window(frozen_base):
    assert _trained_recall(frozen_base, None) < 2.5 * CHANCE


@pytest.mark.slow
@pytest.mark.parametrize("option", ["pre_attention", "hybrid", "cache_replacement", "cache_replacement_kv_slots"])
def test_memory_variant_recalls_beyond_its_window(frozen_base, option):
    ttt = _ttt(option)
    assert ttt["ttt_layer"]["rule"] == "delta"  # the product's memory, as composed
    recall = _trained_recall(frozen_base, ttt)
    print(f"{option}: recall {recall:.3f} beyond the window (chance {CHANCE:.3f})")
    assert recall > 5 * CHANCE, f"{option}: recall {recall:.3f} beyond the window, chance {CHANCE:.3f}"
