"""``post_attention``: TTT on the stream after the attention block, before the feed-forward.

As in the video model and the failed port. Kept as a baseline: it only sees what attention kept,
so it cannot bring back what the window dropped (no memory of older frames).
"""

from __future__ import annotations

import torch

from moshi_ttt.models.variants.base import TTTWrappedLayer, WrappingVariant, register


class PostAttentionLayer(TTTWrappedLayer):
    variant_name = "post_attention"

    def forward_with_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        if cross_attention_src is not None:
            raise ValueError(f"{self.name}: post_attention does not support cross-attention layers")
        x = self.layer._sa_block(x)
        x = x + self._ttt(self.ttt_norm(x))
        x = self.layer._ff_block(x)
        self._advance_layer_offset(x.shape[1])
        return x


@register
class PostAttention(WrappingVariant):
    name = "post_attention"
    layer_class = PostAttentionLayer
    has_memory = False
    order = 20

    @classmethod
    def context_message(cls, name: str, window: str, where: str, wraps: int, ttt_window: int | None) -> str:
        return " (post_attention TTT only sees what attention kept: it cannot bring them back)"
