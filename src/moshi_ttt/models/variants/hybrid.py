"""``hybrid``: local attention over the last W frames beside a TTT branch over the whole history.

``attn_W(h) + tanh(g) * proj(norm(TTT(h)))``, h = the attention's input norm (shared). Attention
keeps full strength and the projection starts at zero, so step 0 is exactly the frozen model with
window W = ``ttt.ttt_layer_attention_window`` (as LaCT adds its normalised fast-weight read to the
window attention at full scale). The window is the variant's own: stages do not change it.
"""

from __future__ import annotations

import torch
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from moshi_ttt.models.attention import LocalStreamingAttention
from moshi_ttt.models.variants.base import (
    InstallContext,
    TTTWrappedLayer,
    VariantModule,
    WrappingVariant,
    register,
)


class HybridLayer(TTTWrappedLayer):
    variant_name = "hybrid"
    own_norm = False  # both branches read the attention's input norm

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

    def forward_with_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        return self._hybrid(x, use_ttt=True)

    def forward_without_ttt(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None) -> torch.Tensor:
        return self._hybrid(x, use_ttt=False)


@register
class Hybrid(WrappingVariant):
    name = "hybrid"
    layer_class = HybridLayer
    order = 30

    def attention_window(self) -> int:
        return int(self.settings.ttt_layer_attention_window)

    def install(self, layer: StreamingTransformerLayer, name: str, ctx: InstallContext
                ) -> tuple[nn.Module, VariantModule]:
        if layer.skip_self_attn:
            raise ValueError(f"{name}: hybrid needs a layer with self-attention")
        LocalStreamingAttention.from_moshi(layer.self_attn, self.attention_window(), ctx.chunk_size, ctx.backend)
        layer.self_attn.fixed_window = True  # a stage's attention_window leaves it alone
        return super().install(layer, name, ctx)

    @classmethod
    def context_message(cls, name: str, window: str, where: str, wraps: int, ttt_window: int | None) -> str:
        return (f"{name}: local window {window} in parallel with a TTT memory over the whole stream (older frames "
                "live in the memory, not lost)")
