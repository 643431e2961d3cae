"""RoPE position interpolation: exact at scale 1, positions divided by the scale, streaming intact."""

from __future__ import annotations

import copy

import pytest
import torch
from moshi.modules.rope import apply_rope

from moshi_ttt.models import MoshiSourceConfig, load_base_moshi
from moshi_ttt.models.insert import install_ttt
from moshi_ttt.models.rope import ScaledRotaryEmbedding, install_position_scale


@pytest.mark.parametrize("interleave", [True, False])
def test_scaled_positions_are_divided_positions(interleave):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 16, generator=g), torch.randn(2, 3, 10, 16, generator=g)
    rope = ScaledRotaryEmbedding(interleave=interleave, max_period=500.0)
    rope.position_scale = 1.0
    offset = torch.tensor([0, 7])
    for a, b in zip(rope(q, k, offset), apply_rope(q, k, offset, 500.0, interleave)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # scale 1 is moshi's own rotation
    rope.position_scale = 2.0
    # a query/key pair at positions (2p, 2s) scaled by 2 scores like (p, s) unscaled
    q1, k1 = q[:, :, :1].expand(-1, -1, 10, -1).contiguous(), k[:, :, :1].expand(-1, -1, 10, -1).contiguous()
    even = torch.zeros(2, dtype=torch.long)
    sq, sk = rope(q1, k1, even)
    rq, rk = apply_rope(q1, k1, even, 500.0, interleave)
    scaled = sq[:, :, 8] @ sk[:, :, 2].transpose(-1, -2)  # positions 8 and 2 -> 4 and 1
    ref = rq[:, :, 4] @ rk[:, :, 1].transpose(-1, -2)
    torch.testing.assert_close(scaled, ref, atol=1e-5, rtol=1e-5)
    assert (rope(q, k, even)[0] - apply_rope(q, k, even, 500.0, interleave)[0]).abs().max() > 1e-3


def test_position_scale_reaches_every_layer_and_streaming_agrees(tiny_lm_kwargs):
    """The shared RoPE is converted once; the training forward and a frame-by-frame stream agree,
    and differ from the unscaled model."""
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs={**tiny_lm_kwargs, "context": 32}, seed=0))
    model = copy.deepcopy(base)
    install_ttt(model, {"variant": "cache_replacement", "memory_read": "kv_slots", "ttt_layer_attention_window": 8, "layer_indices": [-1],
                        "rope_position_scale": 4.0, "ttt_layer": {}})
    ropes = {id(m.rope) for m in model.transformer.modules() if getattr(m, "rope", None) is not None}
    assert len(ropes) == 1 and model.transformer.rope.position_scale == 4.0
    for m in model.modules():
        if hasattr(m, "gate_alpha"):
            torch.nn.init.constant_(m.gate_alpha, 0.5)
    x = torch.randn(2, 24, tiny_lm_kwargs["dim"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.transformer(x)
        with model.transformer.streaming(2):
            stream = torch.cat([model.transformer(x[:, t : t + 1]) for t in range(24)], dim=1)
        unscaled = copy.deepcopy(model)
        unscaled.transformer.rope.position_scale = 1.0
        other = unscaled.transformer(x)
    torch.testing.assert_close(stream, full, atol=2e-5, rtol=1e-4)
    assert (other - full).abs().max() > 1e-3


def test_bad_scale_is_named():
    class NoRope(torch.nn.Module):
        rope = None

    with pytest.raises(ValueError, match="rope_position_scale"):
        install_position_scale(NoRope(), 2.0)
    rope_holder = torch.nn.Module()
    rope_holder.rope = ScaledRotaryEmbedding(interleave=True)
    with pytest.raises(ValueError, match="rope_position_scale=-1"):
        install_position_scale(rope_holder, -1)
