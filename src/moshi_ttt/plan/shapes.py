"""The model and TTT layout the planner counts: read off the real constructors on the ``meta`` device.

``model_shape`` builds moshi's ``LMModel`` (with LoRA as ``build_model`` applies it) on the meta
device - no memory, no download, no values - and reads widths, layer counts, parameter and matmul
weight counts off it; ``ttt_shape`` puts the configured variant in with ``install_ttt`` itself and
asks the variant what each layer it built holds (``Variant.layer_shape``). Both are cached.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import dataclass, replace

from moshi_ttt.plan.config import lm_kwargs_for
from moshi_ttt.plan.flops import ttt_inner_flops


# ---------------------------------------------------------------------------------------------
# model shape (exact, from the constructor on the meta device)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    dim: int
    num_layers: int
    num_heads: int
    hidden: int  # gating hidden width of a temporal layer
    context: int | None
    text_out: int
    card: int
    dep_q: int
    dep_dim: int
    dep_layers: int
    dep_heads: int
    dep_hidden: int
    dep_checkpointing: bool
    frozen: int  # every base parameter (LoRA's frozen_W included)
    lora: int  # LoRA A/B parameters
    lora_depformer: bool  # LoRA wraps the depformer too (model.lora.modules=all)
    lora_rank: int
    small_params: int  # elements in tensors below ZeRO-3's default persistence threshold
    layer_params: tuple[int, ...]  # all parameters of each temporal layer (with LoRA)
    layer_mm: tuple[int, ...]  # matmul weights of each temporal layer (with LoRA)
    lora_mm: int  # LoRA matmul weights (all of LoRA's parameters)
    head_mm_flops: int  # forward FLOPs per frame of text head, depformer_in, depformer, audio heads
    dep_attention_flops: int  # forward attention FLOPs per frame in the depformer
    lm_kwargs_json: str = ""  # the constructor arguments (ttt_shape builds the TTT layers into this model)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@contextlib.contextmanager
def _skip_init():
    """No-op ``torch.nn.init`` while building on the meta device: there are no values to fill, and
    tracing the meta kernels of the random initialisers costs seconds for the 7B."""
    import torch

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _meta_lm(kwargs: dict):
    """moshi's LMModel from its constructor on the meta device, every parameter frozen."""
    import torch
    from moshi.models.lm import LMModel

    with torch.device("meta"), _skip_init():
        model = LMModel(**{**kwargs, "device": "meta"})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=16)
def _model_shape(lm_kwargs_json: str, lora_rank: int, lora_modules: str, persistence: int) -> ModelShape:
    import torch

    from moshi_ttt.models.lora import apply_lora

    kwargs = json.loads(lm_kwargs_json)
    model = _meta_lm(kwargs)
    apply_lora(model, lora_rank, 2.0, lora_modules)

    def mm(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    def trainable(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def first(module):
        return module[0] if isinstance(module, torch.nn.ModuleList) else module

    layers = model.transformer.layers
    layer0, dep = layers[0], model.depformer
    dep0 = dep.layers[0]
    dep_q, dep_dim = model.dep_q, dep0.self_attn.embed_dim
    # Per frame, each of the dep_q steps runs one weight set (weights_per_step) of every depformer
    # layer, one depformer_in projection and one audio head.
    dep_sets = len(dep0.self_attn.in_projs)
    head_flops = (2 * mm(model.text_linear) + 2 * mm(model.depformer_in) * dep_q // len(model.depformer_in)
                  + 2 * mm(dep) * dep_q // dep_sets + 2 * mm(model.linears))
    dep_attn = 4 * dep_q * dep_dim * dep_q * len(dep.layers)  # scores + values over <= dep_q keys, per frame
    total = sum(p.numel() for p in model.parameters())
    n_lora = trainable(model)
    return ModelShape(
        dim=model.dim,
        num_layers=len(layers),
        num_heads=layer0.self_attn.num_heads,
        hidden=first(layer0.gating).linear_out.in_features,
        context=kwargs.get("context"),
        text_out=model.text_linear.out_features,
        card=model.card,
        dep_q=dep_q,
        dep_dim=dep_dim,
        dep_layers=len(dep.layers),
        dep_heads=dep0.self_attn.num_heads,
        dep_hidden=first(dep0.gating).linear_out.in_features,
        dep_checkpointing=bool(dep.checkpointing),
        frozen=total - n_lora,
        lora=n_lora,
        lora_depformer=lora_modules == "all" and lora_rank > 0,
        lora_rank=lora_rank,
        small_params=sum(p.numel() for p in model.parameters() if p.numel() < persistence),
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layer_mm=tuple(mm(layer) for layer in layers),
        lora_mm=n_lora,
        head_mm_flops=head_flops,
        dep_attention_flops=dep_attn,
        lm_kwargs_json=lm_kwargs_json,
    )


def model_shape(model_cfg: dict, persistence: int = 100_000) -> ModelShape:
    lora = model_cfg.get("lora") or {}
    kwargs = lm_kwargs_for(model_cfg)
    shape = _model_shape(json.dumps(kwargs, sort_keys=True), int(lora.get("rank", 0) or 0),
                         str(lora.get("modules", "transformer")), int(persistence))
    if model_cfg.get("gradient_checkpointing") and not shape.dep_checkpointing:
        shape = replace(shape, dep_checkpointing=True)  # build_model checkpoints the depformer too
    return shape


# ---------------------------------------------------------------------------------------------
# TTT shape (counted on the TTT layers install_ttt builds, on the meta device)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TTTShape:
    variant: str
    layers: tuple[int, ...]
    heads: int
    head_dim: int
    inner: str
    hidden: int  # MLP inner hidden width (0 for linear)
    mini_batch: int
    group: int  # scan checkpoint group (mini-batches, or the delta rule's chunks); 0 = none
    params_per_layer: int
    mm_per_layer: int  # matmul weights per TTT layer (trainable projections)
    extra_frozen_mm: int  # frozen matmul weights run again per TTT layer (cache_replacement's re-projection)
    windows: dict[int, int]  # attention window of the TTT layers whose variant fixes it (hybrid, cache_replacement)
    rule: str = "minibatch_gd"  # ttt.ttt_layer.rule
    chunk: int = 0  # the delta rule's chunk (frames)

    @property
    def inner_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def fast_weight(self) -> int:
        """Fast-weight elements of one head (one sample)."""
        d, m = self.head_dim, self.hidden
        return d * d + d if self.inner == "linear" else d * m + m + m * d + d

    @property
    def params(self) -> int:
        return self.params_per_layer * len(self.layers)

    def inner_flops(self, mini_batch: int) -> int:
        """Forward FLOPs of the memory per token, all heads (``mini_batch``: minibatch_gd's)."""
        return ttt_inner_flops(self.rule, self.inner, self.heads, self.head_dim, self.hidden, mini_batch, self.chunk)

    def sequential_steps(self, frames: int, mini_batch: int) -> int:
        """Steps the memory takes one after the other over ``frames``: chunks (delta) or mini-batches."""
        return math.ceil(frames / (self.chunk if self.rule == "delta" else mini_batch))


def ttt_shape(ttt_cfg, shape: ModelShape) -> TTTShape | None:
    """The TTT layers ``install_ttt`` would add (``None`` for ``ttt.variant=none``), from the ``ttt``
    section read as ``install_ttt`` reads it: ``install_ttt`` itself puts the registered variant into
    ``shape``'s model built on the meta device (no memory, no values), and the variant counts each
    layer it built (``Variant.layer_shape``: new parameters, matmul weights, window, memory)."""
    from moshi_ttt.config.groups import ttt_dict
    from moshi_ttt.models.variants import NO_TTT, variant_class

    settings = ttt_dict(ttt_cfg)
    if settings["variant"] == NO_TTT:
        return None
    if not shape.lm_kwargs_json:
        raise ValueError("ttt_shape: the ModelShape has no lm_kwargs_json (make it with model_shape)")
    return _ttt_shape(shape.lm_kwargs_json, json.dumps(settings, sort_keys=True), variant_class(settings["variant"]))


@functools.lru_cache(maxsize=32)
def _ttt_shape(lm_kwargs_json: str, ttt_json: str, variant) -> TTTShape:
    import torch

    from moshi_ttt.models.insert import install_ttt, selected_layers

    settings = json.loads(ttt_json)
    model = _meta_lm(json.loads(lm_kwargs_json))
    with torch.device("meta"), _skip_init():
        modules = install_ttt(model, settings)
    layers = tuple(selected_layers(settings, len(model.transformer.layers)))
    shapes = [variant.layer_shape(model.transformer.layers[i], m) for i, m in zip(layers, modules)]
    first = shapes[0]
    if any(replace(s, window=None) != replace(first, window=None) for s in shapes[1:]):
        raise ValueError(f"ttt.variant={settings['variant']}: its layers differ in shape ({shapes}); the planner "
                         "counts one TTT layer shape")
    windows = {i: s.window for i, s in zip(layers, shapes) if s.window is not None}
    return TTTShape(settings["variant"], layers, first.heads, first.head_dim, first.inner, first.hidden,
                    first.mini_batch, first.group, first.params, first.matmul, first.frozen_matmul, windows,
                    first.rule, first.chunk)


