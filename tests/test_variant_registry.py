"""A new variant is one module + one YAML: a throwaway variant defined and registered in this file
goes through install_ttt (and streaming), config validation, the planner and the diagnostics
without any other file naming it."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from moshi_ttt import plan as P
from moshi_ttt.config.errors import ConfigError
from moshi_ttt.config.validate import validate_config
from moshi_ttt.models.variants import (
    TTTWrappedLayer,
    WrappingVariant,
    register,
    registered,
    unregister,
    variant_names,
)

REPO_CONF = P.DEFAULT_CONFIG_DIR


class ScaledResidualLayer(TTTWrappedLayer):
    """TTT after the whole layer, scaled by a learned scalar: y = L(x); y + s * TTT(norm(y))."""

    variant_name = "scaled_residual"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(()))  # a parameter no planner formula knows of

    def forward_with_ttt(self, x, cross_attention_src):
        y = self.layer(x, cross_attention_src)
        return y + self.scale * self._ttt(self.ttt_norm(y))

    def opening_parameters(self):
        return [*super().opening_parameters(), self.scale]


class ScaledResidual(WrappingVariant):
    name = "scaled_residual"
    layer_class = ScaledResidualLayer
    has_memory = False
    color = "#9467bd"


@pytest.fixture
def scaled_residual(tmp_path):
    """The variant registered, and a copy of conf/ with its one YAML added."""
    register(ScaledResidual)
    conf = tmp_path / "conf"
    shutil.copytree(REPO_CONF, conf)
    (conf / "ttt" / "scaled_residual.yaml").write_text("variant: scaled_residual\n")
    yield conf
    unregister("scaled_residual")


def test_the_builtin_variants_are_registered():
    assert variant_names() == ("none", "pre_attention", "post_attention", "hybrid", "cache_replacement")
    assert [v.name for v in registered() if v.has_memory] == ["pre_attention", "hybrid", "cache_replacement"]
    with pytest.raises(ValueError, match="already"):
        register(type("Other", (WrappingVariant,), {"name": "hybrid"}))


@pytest.mark.parametrize("variant", ["pre_attention", "post_attention", "hybrid", "cache_replacement"])
def test_attention_window_is_the_window_the_built_layers_keep(tiny_lm_kwargs, variant):
    """What a variant says of its window without building (``attention_window``) is what its
    layers keep once installed (the planner reads the built layers; the teacher check reads it)."""
    from moshi_ttt.config.groups import ttt_settings
    from moshi_ttt.models import MoshiSourceConfig, load_base_moshi
    from moshi_ttt.models.insert import install_ttt
    from moshi_ttt.models.variants import base_layer, variant_for

    settings = ttt_settings({"variant": variant, "layer_indices": [-1], "ttt_layer_attention_window": 10,
                             "ttt_layer": {}})
    model = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs={**tiny_lm_kwargs, "context": 64}))
    install_ttt(model, settings)
    attn = base_layer(model.transformer.layers[-1]).self_attn
    kept = attn.context if getattr(attn, "fixed_window", False) else None
    assert variant_for(settings).attention_window() == kept
    assert kept == {"hybrid": 10, "cache_replacement": 11}.get(variant)  # (ceil(W / 1) + 1) x 1: the delta rule


def test_a_variant_registered_elsewhere_installs_validates_and_plans(scaled_residual, tiny_lm_kwargs):
    from moshi_ttt.diagnostics.context import check_context
    from moshi_ttt.diagnostics.layout import model_layout, ttt_modules
    from moshi_ttt.models import count_parameters
    from moshi_ttt.models.build import build_model

    cfg = P.compose_config(["model=tiny", "ttt=scaled_residual", "ttt.layer_indices=[-1]",
                            "model.lm_kwargs.context=16"], scaled_residual)
    validate_config(cfg)
    model_cfg, ttt_cfg = P._plain(cfg.model), P._plain(cfg.ttt)
    model = build_model(model_cfg, ttt_cfg)
    layer = model.transformer.layers[-1]
    assert isinstance(layer, ScaledResidualLayer) and layer.placement == "scaled_residual"

    # step 0 is the frozen base (zero read projection); streaming equals the training forward
    x = torch.randn(2, 20, model.dim)
    with torch.no_grad():
        full = model.transformer(x)
        layer.ttt_enabled = False
        torch.testing.assert_close(model.transformer(x), full, atol=1e-6, rtol=0)
        layer.ttt_enabled = True
        for p in layer.ttt.parameters():
            p.add_(0.1 * torch.randn_like(p))
        full = model.transformer(x)
        layer.ttt_enabled = False
        assert (full - model.transformer(x)).abs().max() > 1e-4  # the branch is used once opened
        layer.ttt_enabled = True
        with model.transformer.streaming(2):
            streamed = torch.cat([model.transformer(x[:, t:t + 1]) for t in range(20)], dim=1)
    torch.testing.assert_close(streamed, full, atol=1e-5, rtol=1e-4)

    # the planner counts what was built (the scale too), from the variant installed on the meta device
    inputs = P.prepare(cfg)
    built = count_parameters(model)
    assert inputs.ttt.variant == "scaled_residual" and inputs.ttt.layers == (len(model.transformer.layers) - 1,)
    assert inputs.ttt.params == built["trainable"] == sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert inputs.ttt.windows == {}  # the layer keeps the model's window
    assert P.plan(cfg, 1)[0].counts["ttt"] == built["trainable"]

    # the diagnostics read the kind and whether it keeps older frames off the registry
    layout = model_layout(model)
    assert layout.ttt_variant == "scaled_residual" and layout.layers[-1].kind == "scaled_residual"
    context = check_context(layout, frames=64)
    assert context.metrics["layers"][layer.ttt_name]["retains_older_frames"] is False
    assert layer.ttt_name in context.metrics["layers_forgetting"]
    assert [m.kind for m in ttt_modules(model)] == ["scaled_residual"]

    # once unregistered, the same config is refused, and the message lists what is registered
    unregister("scaled_residual")
    with pytest.raises(ConfigError, match=r"^ttt\.variant='scaled_residual': one of none, pre_attention"):
        validate_config(cfg)
