"""Where TTT goes inside Moshi's temporal transformer: the variants of the design.

- ``pre_attention``: ``x <- x + TTT(norm(x))`` before the layer; TTT sees the raw residual
  stream before attention can lose anything. Attention unchanged.
- ``post_attention``: TTT on the stream after the attention block, as in the video model and
  the failed port. Kept as a baseline: it only sees what attention kept.
- ``hybrid``: local attention over the last W frames in parallel with a TTT branch over the
  whole history: ``attn_W(h) + tanh(g) * proj(norm(TTT(h)))``. Attention keeps full strength
  and the projection starts at zero, so step 0 is exactly the frozen model with window W
  (as LaCT adds its normalised fast-weight read to the window attention at full scale).
- ``cache_replacement``: see ``cache_replacement.py`` (the layer's own keys/values that leave a
  short window are written into a TTT memory that the queries read).

Each wrapped layer is a moshi ``StreamingModule``, so ``lm.streaming(B)`` (and LMGen) gives it
a per-sample TTT state that is carried across steps and reset per conversation; a training
forward starts every sample from the learned initial fast weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer, create_norm_fn
from torch import nn

from moshi_ttt.models.segments import current_segments, per_segment
from moshi_ttt.ttt import TTTConfig, TTTLayer, TTTState, check_stage_mini_batch

VARIANTS = ("none", "pre_attention", "post_attention", "hybrid", "cache_replacement")
PLACEMENTS = ("pre_attention", "post_attention", "hybrid")


@dataclass
class _TTTStreamState(State):
    ttt: TTTState | None = None
    make_fresh: object = field(default=None, repr=False)

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        if self.ttt is not None:
            self.ttt = self.ttt.reset(reset_mask)


class TTTWrappedLayer(StreamingModule[_TTTStreamState]):
    """A moshi transformer layer with a TTT layer placed before, after or beside its attention.

    The moshi layer stays a child (``.layer``) and runs its own blocks; only their order and the
    TTT branch are added here. ``ttt_enabled=False`` bypasses the branch (the "is TTT used?"
    diagnostic compares the two).
    """

    def __init__(self, layer: StreamingTransformerLayer, placement: str, ttt_config: TTTConfig, dim: int,
                 name: str, norm: str = "rms_norm_f32"):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"ttt.variant={placement!r}: a wrapped layer is one of {PLACEMENTS}")
        if placement == "hybrid" and layer.skip_self_attn:
            raise ValueError(f"{name}: hybrid needs a layer with self-attention")
        self.layer = layer
        self.placement = placement
        self.name = name
        self.ttt = TTTLayer(ttt_config, dim, name=name)
        # pre/post read a normalised stream through their own (trainable) norm; hybrid shares
        # the attention's input norm so both branches see the same thing. The TTT layer's own
        # post-norm, zero-initialised out-projection and gate are the branch's "proj(norm(.))".
        self.ttt_norm = create_norm_fn(norm, dim) if placement != "hybrid" else None
        self.ttt_enabled = True

    def _init_streaming_state(self, batch_size: int) -> _TTTStreamState:
        device = self.ttt.gate_alpha.device
        return _TTTStreamState(batch_size, device, ttt=self.ttt.init_state(batch_size, device))

    def _ttt(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        segments = current_segments() if state is None else None
        if segments is not None:  # packed conversations: a fresh memory for each
            return per_segment(x, segments, lambda piece: self.ttt(piece)[0])
        update, new_state = self.ttt(x, state.ttt if state is not None else None)
        if state is not None:
            state.ttt = new_state
        return update

    def _advance_layer_offset(self, T: int) -> None:
        # moshi's layer counts its streamed steps in forward(); we call its blocks directly.
        layer_state = self.layer._streaming_state
        if layer_state is not None:
            layer_state.offset_cpu += T

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None) -> torch.Tensor:
        if not self.ttt_enabled:
            if self.placement == "hybrid":
                return self._hybrid(x, use_ttt=False)
            return self.layer(x, cross_attention_src)
        if self.placement == "pre_attention":
            x = x + self._ttt(self.ttt_norm(x))
            return self.layer(x, cross_attention_src)
        if self.placement == "post_attention":
            if cross_attention_src is not None:
                raise ValueError(f"{self.name}: post_attention does not support cross-attention layers")
            x = self.layer._sa_block(x)
            x = x + self._ttt(self.ttt_norm(x))
            x = self.layer._ff_block(x)
            self._advance_layer_offset(x.shape[1])
            return x
        return self._hybrid(x, use_ttt=True)

    def _hybrid(self, x: torch.Tensor, use_ttt: bool) -> torch.Tensor:
        layer = self.layer
        h = layer.norm1(x)
        attn = layer.self_attn(h, h, h)
        # attention at full strength; the memory read is added (zero at step 0: out_proj = 0)
        mixed = attn + self._ttt(h).to(attn.dtype) if use_ttt else attn
        x = x.to(mixed) + layer.layer_scale_1(mixed)
        x = layer._ff_block(x)
        self._advance_layer_offset(x.shape[1])
        return x

    def configure_for_stage(self, ttt_mini_batch_size: int | None = None, window: int | None = None) -> None:
        check_stage_mini_batch(ttt_mini_batch_size, self.ttt.memory.mini_batch_size, f"{self.name}: a stage's TTT mini-batch")

    def opening_parameters(self) -> list[nn.Parameter]:
        """What opens the memory's path (gate, read projection, inner-lr projection): the
        optimiser gives these their own LR scale and no weight decay."""
        ttt = self.ttt
        out = [ttt.gate_alpha, ttt.lr_proj.weight, ttt.lr_proj.bias]
        return out + ([ttt.out_proj.weight] if ttt.out_proj is not None else [])

    def health(self) -> dict[str, float]:
        stats = self.ttt.health()
        with torch.no_grad():  # the gate and read projection as they are now, logged per layer
            gate = torch.tanh(self.ttt.gate_alpha.float())
            stats["gate_mean_abs"], stats["gate_max_abs"] = float(gate.abs().mean()), float(gate.abs().max())
            if self.ttt.out_proj is not None:
                stats["read_proj_norm"] = float(self.ttt.out_proj.weight.float().norm())
        return stats
