"""The variant registry, the interface of a variant, and what the layer-wrapping variants share.

A variant is one way of putting a TTT memory into a layer of Moshi's temporal transformer. Each
is one module of this package that owns all of it:

- a ``Variant`` subclass registered under its ``ttt.variant`` name (``@register``): how it goes
  into a layer (``install``), the settings it refuses (``check``), the attention window its
  layers keep (``attention_window``), and what the diagnostics and ``make memory-proof`` need to
  know (``has_memory``, ``context_message``);
- the module it installs, a ``VariantModule``: its streaming state, its trainable and opening
  parameters, its health statistics, and what the planner counts (``layer_shape``, from the
  module built on the meta device).

``install_ttt``, the planner, the diagnostics, the memory proof and config validation ask the
registry (``variant_for``, ``variant_class``, ``registered``); none of them names a variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer, create_norm_fn
from torch import nn

from moshi_ttt.models.segments import current_segments, per_segment
from moshi_ttt.ttt import TTTConfig, TTTLayer, TTTState, check_stage_mini_batch

if TYPE_CHECKING:
    from moshi_ttt.config.schema import TTTVariantConfig
    from moshi_ttt.ttt import TTTMemory

#: ``ttt.variant`` of a model without TTT (not a registered variant).
NO_TTT = "none"


# ---------------------------------------------------------------------------------------------
# what a variant installs
# ---------------------------------------------------------------------------------------------
class VariantModule:
    """Mixin of the module a variant installs into a layer (the wrapped layer itself, or its
    attention with a memory): the one interface training, diagnostics and the planner read.

    Besides the members below it has ``variant_name`` (its variant), ``ttt_name`` ("layer3", as
    the logs name it), ``ttt_enabled`` (False bypasses the memory: the "is TTT used?" check),
    ``opening_parameters()`` (gate, read projection, inner-lr projection: their own LR scale and
    no weight decay) and ``health()`` (floats for the logs, per layer); ``configure_for_stage``
    takes a curriculum stage's settings."""

    __slots__ = ()  # no state of its own; list it after the nn.Module base (cache_replacement's class is swapped in)
    variant_name: ClassVar[str] = ""
    ttt_name: str
    ttt_enabled: bool

    @property
    def ttt_memory(self) -> TTTMemory:
        """The fast-weight memory (initial weights, mini-batch size, inner model)."""
        return self.memory

    @property
    def gate_parameter(self) -> torch.Tensor:
        """alpha of the output gate tanh(alpha) (per channel, or per head)."""
        return self.gate_alpha

    @property
    def read_projection(self) -> torch.Tensor | None:
        """The weight of the zero-initialised projection of the memory read (None: it has none)."""
        proj = getattr(self, "read_proj", None)
        return None if proj is None else proj.weight

    @property
    def layout_ttt_window(self) -> int | None:
        """``ttt.ttt_layer_attention_window`` as the diagnostics' layout reports it, for variants
        whose window is derived from it (None: not reported)."""
        return None

    def rerun_frozen_matmul(self) -> int:
        """Frozen matmul weights the module runs a second time per token (the planner's FLOPs)."""
        return 0

    # ---- shared by the variants' modules ----------------------------------------------------
    def configure_for_stage(self, ttt_mini_batch_size: int | None = None, window: int | None = None) -> None:
        check_stage_mini_batch(ttt_mini_batch_size, self.ttt_memory.mini_batch_size,
                               f"{self.ttt_name}: a stage's TTT mini-batch")

    def gate_health(self) -> dict[str, float]:
        """The gate and read projection as they are now (the memory's own stats are as of its last forward)."""
        with torch.no_grad():
            gate = torch.tanh(self.gate_parameter.float())
            stats = {"gate_mean_abs": float(gate.abs().mean()), "gate_max_abs": float(gate.abs().max())}
            if self.read_projection is not None:
                stats["read_proj_norm"] = float(self.read_projection.float().norm())
        return stats

    def _per_conversation(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(x)``, once per conversation of a packed training sequence: each starts from a fresh
        memory, as at inference (a streamed step carries its state instead)."""
        segments = current_segments() if self._streaming_state is None else None
        return fn(x) if segments is None else per_segment(x, segments, fn)


class MemoryStateMixin:
    """Mixin of a streaming state (a dataclass with a ``ttt`` field): a reset sample restarts its memory."""

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if self.ttt is not None:
            self.ttt = self.ttt.reset(reset_mask)


def base_layer(layer: nn.Module) -> nn.Module:
    """The moshi layer inside a wrapped layer (the layer itself when it is not wrapped)."""
    return layer.layer if isinstance(layer, TTTWrappedLayer) else layer


def variant_module_of(layer: nn.Module) -> VariantModule | None:
    """The variant module a transformer layer carries (the layer or one of its children)."""
    return next((m for m in layer.modules() if isinstance(m, VariantModule)), None)


@dataclass(frozen=True)
class LayerShape:
    """What the planner needs from one layer as a variant built it (counted, not derived)."""

    params: int  # the variant's new (trainable) parameters in the layer
    matmul: int  # trainable matmul weights (nn.Linear weights) run once per token
    frozen_matmul: int  # frozen matmul weights run a second time per token
    window: int | None  # the attention window the variant fixes for the layer (None: the model's/stage's)
    heads: int  # memory heads
    head_dim: int
    inner: str  # linear | mlp
    hidden: int  # the MLP inner model's hidden width (0 for linear)
    fast_weight: int  # fast-weight elements of one head (one sample)
    mini_batch: int
    group: int  # scan checkpoint group (mini-batches, or the delta rule's chunks); 0 = none
    rule: str = "minibatch_gd"  # ttt.ttt_layer.rule
    chunk: int = 0  # the delta rule's chunk (frames); 0 for minibatch_gd


# ---------------------------------------------------------------------------------------------
# the interface of a variant, and the registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstallContext:
    """What a variant needs to know of the model it goes into, besides the layer."""

    dim: int
    norm: str  # the model's norm type (rms_norm_f32 | layer_norm): a variant's own input norm copies it
    chunk_size: int | None  # ttt.attention_chunk_size
    backend: str  # ttt.attention_backend
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Variant:
    """One way of putting TTT into a layer. Subclass it in a module of this package, set ``name``
    (the ``ttt.variant`` value), implement ``install`` and decorate the class with ``@register``;
    add ``conf/ttt/<name>.yaml``. An instance holds the ``ttt`` settings it was made for."""

    name: ClassVar[str]
    has_memory: ClassVar[bool] = True
    """Its layers keep frames older than their attention window (in a TTT memory that reads them).
    The context check counts them as kept, the memory proof expects them to recall beyond the
    window, and lists the variants without one first (as baselines)."""
    order: ClassVar[int] = 100
    """Position in listings (``variant_names``, plots, the memory proof), then registration order."""

    def __init__(self, settings: TTTVariantConfig):
        self.settings = settings

    # ---- config -----------------------------------------------------------------------------
    def check(self) -> None:
        """Raise a ``ConfigError`` naming the key for a setting this variant cannot work with
        (config validation calls it before anything is built, and so does ``install_ttt``)."""

    def attention_window(self) -> int | None:
        """Frames of attention its layers keep whatever the model's or a stage's window (None:
        its layers follow ``ttt.attention_window`` and the stages, like every other layer)."""
        return None

    # ---- model ------------------------------------------------------------------------------
    def install(self, layer: StreamingTransformerLayer, name: str, ctx: InstallContext
                ) -> tuple[nn.Module, VariantModule]:
        """Put the variant into ``layer`` (a moshi layer, already with local attention); returns
        the module that takes the layer's place in ``transformer.layers`` (``layer`` itself when
        it is changed in place) and the new ``VariantModule``."""
        raise NotImplementedError

    # ---- planner ----------------------------------------------------------------------------
    @classmethod
    def layer_shape(cls, layer: nn.Module, module: VariantModule) -> LayerShape:
        """Count a built layer (on the meta device for the planner): the new parameters are the
        module's trainable ones, its matmul weights those of its trainable ``nn.Linear``s."""
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        matmul = sum(m.weight.numel() for m in module.modules()
                     if isinstance(m, nn.Linear) and m.weight.requires_grad)
        attn = getattr(base_layer(layer), "self_attn", None)
        window = int(attn.context) if getattr(attn, "fixed_window", False) and attn.context is not None else None
        memory = module.ttt_memory
        cfg = memory.config
        heads = int(cfg.num_heads)
        fast_weight = sum(p.numel() for p in memory.initial.values()) // heads
        hidden = int(getattr(memory.inner, "hidden", 0))  # the MLP inner model's width; linear has none
        delta = cfg.rule == "delta"
        return LayerShape(params, matmul, int(module.rerun_frozen_matmul()), window, heads, int(memory.head_dim),
                          str(cfg.inner), hidden, fast_weight, int(memory.mini_batch_size),
                          int(cfg.checkpoint_group_size), str(cfg.rule), int(cfg.chunk_size) if delta else 0)

    # ---- diagnostics ------------------------------------------------------------------------
    @classmethod
    def context_message(cls, name: str, window: str, where: str, wraps: int, ttt_window: int | None) -> str:
        """The context check's line for a layer whose attention window (``window``, as text) is
        shorter than the conversation: with a memory, how the older frames are kept (an "ok"
        finding); without one, a note appended to the "frames are dropped" warning.
        ``where``: "attention window W < intended T"; ``wraps``: times the ring cache wraps."""
        if cls.has_memory:
            return (f"{name}: {where}: attention wraps {wraps}x, but the layer's {cls.name} TTT memory keeps the "
                    "older frames")
        return ""


_REGISTRY: dict[str, type[Variant]] = {}


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: make ``cls`` the variant ``ttt.variant=cls.name`` selects."""
    name = getattr(cls, "name", None)
    if not isinstance(cls, type) or not issubclass(cls, Variant):
        raise TypeError(f"register: {cls!r} is not a Variant subclass")
    if not isinstance(name, str) or not name.isidentifier() or name == NO_TTT:
        raise ValueError(f"register: {cls.__qualname__}.name={name!r} must be an identifier other than {NO_TTT!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"register: variant {name!r} is already {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> type[Variant] | None:
    """Remove a variant (tests that register one of their own); returns it."""
    return _REGISTRY.pop(name, None)


def registered() -> list[type[Variant]]:
    """Every registered variant, in listing order."""
    return sorted(_REGISTRY.values(), key=lambda cls: cls.order)  # stable: then registration order


def variant_names() -> tuple[str, ...]:
    """The values ``ttt.variant`` accepts."""
    return (NO_TTT, *(cls.name for cls in registered()))


def find_variant(name: str) -> type[Variant] | None:
    """The variant of that name, None when none is registered under it (``attention`` layers...)."""
    return _REGISTRY.get(name)


def variant_class(name: str) -> type[Variant]:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"ttt.variant={name!r} must be one of {variant_names()}")
    return cls


def variant_for(settings: TTTVariantConfig) -> Variant | None:
    """The variant ``settings.variant`` names, made for those settings (None for ``none``);
    a ValueError names the variants there are."""
    if settings.variant == NO_TTT:
        return None
    return variant_class(settings.variant)(settings)


def has_memory(kind: str) -> bool:
    """Whether layers of this kind (a variant name, ``attention``, ``no_attention``) keep frames
    older than their attention window."""
    cls = find_variant(kind)
    return cls is not None and cls.has_memory


# ---------------------------------------------------------------------------------------------
# the variants that wrap the whole layer (pre_attention, post_attention, hybrid)
# ---------------------------------------------------------------------------------------------
@dataclass
class _TTTStreamState(MemoryStateMixin, State):
    ttt: TTTState | None = None
    make_fresh: object = field(default=None, repr=False)


class TTTWrappedLayer(StreamingModule[_TTTStreamState], VariantModule):
    """A moshi transformer layer with a TTT layer placed around its blocks; a variant subclasses it
    and says where (``forward_with_ttt``).

    The moshi layer stays a child (``.layer``) and runs its own blocks; only their order and the
    TTT branch are added. ``ttt_enabled=False`` bypasses the branch (``forward_without_ttt``).
    Each wrapped layer is a moshi ``StreamingModule``, so ``lm.streaming(B)`` (and LMGen) gives it
    a per-sample TTT state carried across steps and reset per conversation; a training forward
    starts every sample from the learned initial fast weights.
    """

    own_norm: ClassVar[bool] = True
    """The TTT branch reads the stream through its own (trainable) norm, ``ttt_norm``; False: the
    subclass gives it an input of its own (hybrid shares the attention's norm)."""

    def __init__(self, layer: StreamingTransformerLayer, ttt_config: TTTConfig, dim: int, name: str,
                 norm: str = "rms_norm_f32"):
        super().__init__()
        self.layer = layer
        self.name = name
        self.ttt_name = name
        attention = getattr(layer, "self_attn", None)
        if ttt_config.num_heads is None and attention is None:
            raise ValueError(f"{name}: ttt.ttt_layer.num_heads=null takes the attention's heads, and this layer has "
                             "no self-attention: set it")
        self.ttt = TTTLayer(ttt_config.for_attention(attention.num_heads) if attention is not None else ttt_config,
                            dim, name=name)
        # The TTT layer's own post-norm, zero-initialised out-projection and gate are the
        # branch's "proj(norm(.))".
        self.ttt_norm = create_norm_fn(norm, dim) if self.own_norm else None
        self.ttt_enabled = True

    @property
    def placement(self) -> str:
        return self.variant_name

    # ---- what a variant says ----------------------------------------------------------------
    def forward_with_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward_without_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        """The frozen layer alone (the "is TTT used?" check, the distillation teacher)."""
        return self.layer(x, cross_attention_src)

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None) -> torch.Tensor:
        if not self.ttt_enabled:
            return self.forward_without_ttt(x, cross_attention_src)
        return self.forward_with_ttt(x, cross_attention_src)

    # ---- shared -----------------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> _TTTStreamState:
        device = self.ttt.gate_alpha.device
        return _TTTStreamState(batch_size, device, ttt=self.ttt.init_state(batch_size, device))

    def _ttt(self, x: torch.Tensor) -> torch.Tensor:
        """The gated TTT update of ``x`` [B, T, dim]; carries the streaming state, and gives each
        packed conversation a fresh memory."""
        return self._per_conversation(x, self._ttt_update)

    def _ttt_update(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        update, new_state = self.ttt(x, state.ttt if state is not None else None)
        if state is not None:
            state.ttt = new_state
        return update

    def _advance_layer_offset(self, T: int) -> None:
        """For a subclass that calls the moshi layer's blocks directly: moshi's layer counts its
        streamed steps in forward()."""
        layer_state = self.layer._streaming_state
        if layer_state is not None:
            layer_state.offset_cpu += T

    @torch.no_grad()
    def init_from_attention(self) -> None:
        """Start the TTT branch as a copy of the layer's attention (``ttt.init_from_attention``): its
        query/key/value/output projections from the attention's, its own input norm (if any) from the
        attention's, and the gate at 0 so the layer is still the frozen one. The memory then starts
        by matching and copying what the attention matched and copied inside its window, instead of
        having to discover a lookup through a zero projection."""
        attn, ttt = self.layer.self_attn, self.ttt
        heads, width = int(attn.num_heads), int(attn.embed_dim) // int(attn.num_heads)
        key = "ttt.init_from_attention"
        in_weight = _effective_weight(attn.in_projs[0]) if len(attn.in_projs) == 1 else None
        if in_weight is None or attn.kv_repeat != 1:
            raise ValueError(f"{self.name}: {key} needs one plain in-projection with a key per query head "
                             f"(this attention has {len(attn.in_projs)} in-projections, kv_repeat={attn.kv_repeat})")
        if (ttt.num_heads, ttt.head_dim) != (heads, width) or ttt.out_proj is None:
            raise ValueError(f"{self.name}: {key} needs ttt.ttt_layer.num_heads={heads} and head_dim={width} (the "
                             f"attention's heads) and output_proj=true; got num_heads={ttt.num_heads}, "
                             f"head_dim={ttt.head_dim}, output_proj={ttt.config.output_proj}")
        q, k, v = in_weight.chunk(3, dim=0)
        out_weight = _effective_weight(attn.out_projs[0])
        for proj, weight in ((ttt.q_proj, q), (ttt.k_proj, k), (ttt.v_proj, v), (ttt.out_proj, out_weight)):
            proj.weight.copy_(weight)
        if self.ttt_norm is not None:
            self.ttt_norm.load_state_dict(self.layer.norm1.state_dict())
        ttt.gate_alpha.zero_()

    def opening_parameters(self) -> list[nn.Parameter]:
        """What opens the memory's path (gate, read projection, inner-lr projection): the
        optimiser gives these their own LR scale and no weight decay."""
        ttt = self.ttt
        out = [ttt.gate_alpha, ttt.lr_proj.weight, ttt.lr_proj.bias]
        return out + ([ttt.out_proj.weight] if ttt.out_proj is not None else [])

    def health(self) -> dict[str, float]:
        return {**self.ttt.health(), **self.gate_health()}

    # ---- VariantModule ----------------------------------------------------------------------
    @property
    def ttt_memory(self) -> TTTMemory:
        return self.ttt.memory

    @property
    def gate_parameter(self) -> torch.Tensor:
        return self.ttt.gate_alpha

    @property
    def read_projection(self) -> torch.Tensor | None:
        return None if self.ttt.out_proj is None else self.ttt.out_proj.weight


def _effective_weight(proj: nn.Module) -> torch.Tensor | None:
    """The weight a linear (plain, or moshi's LoRALinear: frozen W + scaling B A) applies; None otherwise."""
    if isinstance(proj, nn.Linear):
        return proj.weight
    frozen, down, up = (getattr(proj, k, None) for k in ("frozen_W", "lora_A", "lora_B"))
    if all(isinstance(m, nn.Linear) for m in (frozen, down, up)):
        return frozen.weight + proj.scaling * (up.weight @ down.weight).to(frozen.weight.dtype)
    return None


class WrappingVariant(Variant):
    """A variant that wraps the whole layer in its ``layer_class`` (a ``TTTWrappedLayer``)."""

    layer_class: ClassVar[type[TTTWrappedLayer]]

    def install(self, layer: StreamingTransformerLayer, name: str, ctx: InstallContext
                ) -> tuple[nn.Module, VariantModule]:
        wrapped = self.layer_class(layer, self.settings.ttt_layer, ctx.dim, name, norm=ctx.norm).to(ctx.device)
        if self.settings.init_from_attention:
            wrapped.init_from_attention()
        return wrapped, wrapped

