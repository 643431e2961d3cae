"""Where TTT goes inside Moshi's temporal transformer: the variants, one module each.

- ``pre_attention``: ``x <- x + TTT(norm(x))`` before the layer; TTT sees the raw residual
  stream before attention can lose anything. Attention unchanged.
- ``post_attention``: TTT on the stream after the attention block, as in the video model and
  the failed port. Kept as a baseline: it only sees what attention kept.
- ``hybrid``: local attention over the last W frames in parallel with a TTT branch over the
  whole history: ``attn_W(h) + tanh(g) * proj(norm(TTT(h)))``; step 0 is the frozen model with
  window W.
- ``cache_replacement``: the layer's own keys/values that leave a short window are written into a
  TTT memory that the queries read (``add`` or ``kv_slots``).

``base`` holds the registry and the interface (``Variant``, ``VariantModule``,
``TTTWrappedLayer``). Every other module of this package is imported here, so its ``@register``
runs: a new variant is one module in this package plus ``conf/ttt/<name>.yaml``; install_ttt, the
planner, the diagnostics, ``make memory-proof`` and config validation find it in the registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from moshi_ttt.models.variants.base import (
    NO_TTT,
    InstallContext,
    LayerShape,
    TTTWrappedLayer,
    Variant,
    VariantModule,
    WrappingVariant,
    base_layer,
    find_variant,
    has_memory,
    register,
    registered,
    unregister,
    variant_class,
    variant_for,
    variant_module_of,
    variant_names,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "NO_TTT",
    "InstallContext",
    "LayerShape",
    "TTTWrappedLayer",
    "Variant",
    "VariantModule",
    "WrappingVariant",
    "base_layer",
    "find_variant",
    "has_memory",
    "register",
    "registered",
    "unregister",
    "variant_class",
    "variant_for",
    "variant_module_of",
    "variant_names",
]
