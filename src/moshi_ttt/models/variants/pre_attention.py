"""``pre_attention``: ``x <- x + TTT(norm(x))`` before the layer.

TTT reads the raw residual stream before attention can lose anything; the attention is
unchanged (the model's window). With the zero-initialised read projection, step 0 is the frozen
model.

The read enters the frozen attention's input, so its gradient has two paths: the residual stream
(what the read is for) and that attention's input at every position of the window (keep the
lookups the attention already makes undisturbed). ``ttt.read_grad_through_attention`` scales the
second: at full strength it drowns the first and the memory does not learn to recall
(docs/memory-proof.md). The forward is the same whatever it is.
"""

from __future__ import annotations

import torch
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from moshi_ttt.config.errors import bad
from moshi_ttt.models.variants.base import (
    InstallContext,
    TTTWrappedLayer,
    VariantModule,
    WrappingVariant,
    register,
)


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward (bit for bit); ``scale`` x its gradient in the backward."""
    if scale == 1.0:
        return x
    detached = x.detach()
    return detached + scale * (x - detached) if scale else detached


class PreAttentionLayer(TTTWrappedLayer):
    variant_name = "pre_attention"
    read_grad_through_attention: float = 1.0  # the variant sets ttt.read_grad_through_attention

    def forward_with_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        read = self._ttt(self.ttt_norm(x))
        layer = self.layer
        if self.read_grad_through_attention == 1.0 or layer.skip_self_attn:
            return layer(x + read, cross_attention_src)
        seen = x + scale_grad(read, self.read_grad_through_attention)  # == x + read, bit for bit
        x = x + read
        h = layer.norm1(seen)
        update = layer.self_attn(h, h, h)
        x = x.to(update) + layer.layer_scale_1(update)  # moshi's _sa_block, with the residual apart
        if layer.cross_attention is not None:
            if cross_attention_src is None:
                raise ValueError(f"{self.name}: this layer has cross-attention and needs its source")
            x = layer._cross_attention_block(x, cross_attention_src)
        x = layer._ff_block(x)
        self._advance_layer_offset(x.shape[1])
        return x


@register
class PreAttention(WrappingVariant):
    name = "pre_attention"
    layer_class = PreAttentionLayer
    order = 10

    def check(self) -> None:
        value = self.settings.read_grad_through_attention
        if not 0.0 <= value <= 1.0:
            raise bad("ttt.read_grad_through_attention", value, "a share of the gradient, in [0, 1]")

    def install(self, layer: StreamingTransformerLayer, name: str, ctx: InstallContext
                ) -> tuple[nn.Module, VariantModule]:
        wrapped, module = super().install(layer, name, ctx)
        wrapped.read_grad_through_attention = float(self.settings.read_grad_through_attention)
        return wrapped, module

    @classmethod
    def context_message(cls, name: str, window: str, where: str, wraps: int, ttt_window: int | None) -> str:
        return (f"{name}: {where}: attention wraps {wraps}x, but the TTT memory before attention has read every "
                "frame (older frames live in the memory)")
