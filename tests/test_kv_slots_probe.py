"""bench/kv_slots_probe.py recomputes a kv_slots layer from its parts; what it reports must be
what the layer does: the window output it compares and the slot share it prints reproduce the
layer's own forward output exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from helpers import open_trainables, tiny_variant_model
from moshi_ttt.models.attention import local_attention

REPO = Path(__file__).resolve().parents[1]


def _probe_module():
    spec = importlib.util.spec_from_file_location("kv_slots_probe", REPO / "bench" / "kv_slots_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_share_and_value_reproduce_the_layer(tiny_lm_kwargs):
    probe = _probe_module().probe
    _, model = tiny_variant_model(tiny_lm_kwargs, "cache_replacement:kv_slots", 4)
    open_trainables(model)
    layer = next(m for m in model.modules() if hasattr(m, "slot_key"))
    x = torch.randn(2, 40, tiny_lm_kwargs["dim"])
    with torch.no_grad():
        got = probe(layer, x, long_window=40)
        # the layer's own joint output, rebuilt from the probe's share: o_L + tanh(g) beta (s read - o_L)
        q0, k0, v, lr, log_decay = layer._memory_inputs(x)
        read, _ = layer._lagged_read(q0, k0, v, lr, log_decay)
        q, k = layer.rope(q0, k0, torch.zeros(2, dtype=torch.long), time_before_heads=False)
        o_window = local_attention(q, k, v, layer.window)
        value = read * layer.slot_scale.view(1, -1, 1, 1)
        joint = o_window + torch.tanh(layer.gate_alpha).view(1, -1, 1, 1) * got["beta"][..., None] * (value - o_window)
        H = joint.shape[1]
        torch.testing.assert_close(layer.project_out(joint), layer(x, x, x), atol=1e-5, rtol=1e-5)
    assert ((got["beta"] > 0) & (got["beta"] < 1)).all()
    assert got["cos_read"].shape == (2, H, 40) and torch.isfinite(got["cos_out"]).all()
