"""``pre_attention``: ``x <- x + TTT(norm(x))`` before the layer.

TTT reads the raw residual stream before attention can lose anything; the attention is
unchanged (the model's window). With the zero-initialised read projection, step 0 is the frozen
model.
"""

from __future__ import annotations

import torch

from moshi_ttt.models.variants.base import TTTWrappedLayer, WrappingVariant, register


class PreAttentionLayer(TTTWrappedLayer):
    variant_name = "pre_attention"

    def forward_with_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        x = x + self._ttt(self.ttt_norm(x))
        return self.layer(x, cross_attention_src)


@register
class PreAttention(WrappingVariant):
    name = "pre_attention"
    layer_class = PreAttentionLayer
    color = "#2ca02c"
    order = 10

    @classmethod
    def context_message(cls, name: str, window: str, where: str, wraps: int, ttt_window: int | None) -> str:
        return (f"{name}: {where}: attention wraps {wraps}x, but the TTT memory before attention has read every "
                "frame (older frames live in the memory)")
