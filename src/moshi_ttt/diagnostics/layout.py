"""What a model is made of, read off the modules: per-layer attention window, TTT placement,
RoPE, and the TTT modules with their gates and memories (no forward pass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from moshi_ttt.models.variants import VariantModule, base_layer, variant_module_of

# A layer's kind: "attention" (no TTT), "no_attention", or the name of the registered variant it
# carries (moshi_ttt.models.variants; ``has_memory`` there: whether it keeps older frames).


@dataclass
class LayerLayout:
    index: int
    name: str  # "layer3", as the TTT modules and the training logs name it
    kind: str  # attention | no_attention | a variant's name
    window: int | None  # frames the self-attention sees (moshi's `context`; None: unbounded)
    trained_context: int | None  # the base model's configured context (what it was trained with)
    num_heads: int
    kv_heads: int
    head_dim: int
    cache_bytes_per_value: int  # bytes of one cached key/value element (the weights' dtype)
    ttt_window: int | None = None  # the variant's layout_ttt_window (cache_replacement: ttt.ttt_layer_attention_window)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelLayout:
    layers: list[LayerLayout]
    dim: int
    positional_embedding: str
    rope_max_period: float | None
    text_card: int
    card: int
    text_padding_ids: tuple[int, ...]
    ttt_variant: str
    rope_position_scale: float = 1.0  # RoPE position interpolation (moshi_ttt.models.rope)

    @property
    def ttt_layers(self) -> list[LayerLayout]:
        return [lay for lay in self.layers if lay.kind not in ("attention", "no_attention")]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_padding_ids"] = list(self.text_padding_ids)
        return d


def model_layout(model) -> ModelLayout:
    """The layout of an LMModel's temporal transformer (moshi's, with or without the TTT variants)."""
    transformer = getattr(model, "transformer", None)
    if transformer is None or not hasattr(transformer, "layers"):
        raise TypeError(f"{type(model).__name__} has no .transformer.layers (expected moshi's LMModel)")
    layers = []
    variants = set()
    for i, layer in enumerate(transformer.layers):
        inner = base_layer(layer)
        attn = inner.self_attn
        module = variant_module_of(layer)
        kind = "attention" if module is None else module.variant_name
        ttt_window = None if module is None else module.layout_ttt_window
        if getattr(inner, "skip_self_attn", False):
            kind = "no_attention"
        if kind not in ("attention", "no_attention"):
            variants.add(kind)
        heads = int(attn.num_heads)
        layers.append(LayerLayout(
            index=i, name=f"layer{i}", kind=kind, window=attn.context,
            trained_context=getattr(attn, "moshi_context", attn.context), num_heads=heads,
            kv_heads=heads // int(getattr(attn, "kv_repeat", 1)), head_dim=int(attn.embed_dim) // heads,
            cache_bytes_per_value=next(attn.parameters()).element_size(), ttt_window=ttt_window))
    rope = getattr(transformer, "rope", None)
    return ModelLayout(
        layers=layers, dim=int(model.dim), positional_embedding=str(transformer.positional_embedding),
        rope_max_period=float(rope.max_period) if rope is not None else None, text_card=int(model.text_card),
        card=int(model.card), text_padding_ids=(int(model.text_padding_token_id), int(model.end_of_text_padding_id)),
        ttt_variant=",".join(sorted(variants)) or "none",
        rope_position_scale=float(getattr(rope, "position_scale", 1.0)) if rope is not None else 1.0)


@dataclass
class TTTModule:
    """One TTT-bearing module, with what the checks read from it."""

    name: str
    kind: str
    module: nn.Module  # the variant's VariantModule (has ttt_enabled, health())
    memory: nn.Module  # its TTTMemory

    @property
    def config(self):
        return self.memory.config

    @property
    def gate(self) -> torch.Tensor:
        """tanh(alpha): the per-channel output gate of the TTT branch."""
        return torch.tanh(self.module.gate_parameter.detach().float())

    @property
    def projection(self) -> torch.Tensor | None:
        """The zero-initialised output projection of the TTT read (None when the layer has none)."""
        proj = self.module.read_projection  # kv_slots has none: its gate is per head
        return None if proj is None else proj.detach().float()

    def fresh_state(self, batch_size: int = 1):
        return self.memory.init_state(batch_size, next(self.memory.parameters()).device)

    def streaming_state(self):
        """The TTT state of the running stream (None outside ``streaming``)."""
        state = self.module._streaming_state
        return None if state is None else state.ttt

    @property
    def weight_matrices(self) -> int:
        return sum(1 for k in self.memory.initial.keys() if k.startswith("W"))

    @property
    def norm_scale(self) -> float:
        """sqrt(head_dim * matrices): the Frobenius norm of identity-like fast weights per head."""
        return float((self.memory.head_dim * self.weight_matrices) ** 0.5)


def ttt_modules(model: nn.Module) -> list[TTTModule]:
    """Every TTT-bearing module of ``model``, in layer order."""
    return [TTTModule(m.ttt_name, m.variant_name, m, m.ttt_memory) for m in model.modules()
            if isinstance(m, VariantModule)]
