"""The ``model`` and ``ttt`` groups as typed objects, from a composed config or any plain dict.

Training composes them against the schema (``ModelConfig``, ``TTTVariantConfig``); checkpoints,
exports, tests and tools hand them over as plain dicts. Both are read here, through the same
dataclasses, so defaults, types and unknown keys are checked in one place and every error names
the key (``ttt.ttt_layer.num_heads``, ``model.lora.rank``) in one line (``ConfigError``).

Renamed keys: the old name still works, in a YAML file, on the command line and in the stored
config of an older checkpoint or export; it is moved to the new name with a warning that names
it (``ConfigDeprecationWarning``, shown by default):

- ``ttt.layers`` -> ``ttt.layer_indices`` (which Moshi layers get TTT)
- ``ttt.layer`` -> ``ttt.ttt_layer`` (the TTT layer's settings, ``moshi_ttt.ttt.TTTConfig``)
- ``ttt.window`` -> ``ttt.ttt_layer_attention_window`` (hybrid / cache_replacement's own window)
- ``curriculum.stages.N.window`` -> ``curriculum.stages.N.attention_window`` (``moshi_ttt.config.stages``)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from moshi_ttt.config.errors import ConfigError, bad
from moshi_ttt.config.schema import ModelConfig, TTTVariantConfig
from moshi_ttt.config.stages import ConfigDeprecationWarning
from moshi_ttt.ttt.config import TTTConfig

#: ``ttt.<old>`` -> ``ttt.<new>``: the old key still works and warns.
TTT_RENAMED = {"layers": "layer_indices", "layer": "ttt_layer", "window": "ttt_layer_attention_window"}
#: Fields kept in the schema only to accept old configs; never in what ``ttt_dict`` returns.
TTT_DEPRECATED = (*TTT_RENAMED, "hybrid_alpha_init")
#: Every renamed key, in full (``explain`` shows the new one for the old).
RENAMED_KEYS = {**{f"ttt.{old}": f"ttt.{new}" for old, new in TTT_RENAMED.items()},
                "curriculum.stages.N.window": "curriculum.stages.N.attention_window"}

_TTT_DEFAULTS = TTTVariantConfig()
_LAYER_DEFAULTS = dataclasses.asdict(TTTConfig.schema_default())  # the rule's own settings: null


def _plain(node) -> dict:
    if node is None:
        return {}
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    if not isinstance(node, Mapping):
        raise ConfigError(f"expected a mapping of settings, got {type(node).__name__}: {node!r}")
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in node.items()}


def _section(where: str) -> str:
    """``ttt`` of ``<checkpoint>: ttt`` (the key a user sets)."""
    return where.rsplit(": ", 1)[-1]


def _warn_renamed(where: str, old: str, new: str, what: str = "") -> None:
    warnings.warn(f"{where}.{old} is deprecated: use {_section(where)}.{new}{what}", ConfigDeprecationWarning,
                  stacklevel=4)


def rename_ttt_keys(ttt, where: str = "ttt", command_line: frozenset[str] = frozenset()) -> dict:
    """A plain copy of a ``ttt`` section with the old key names moved to the new ones (warning for each).

    An old key set next to its new key with another value is an error (which one was meant cannot be
    told), unless the old one was given on the command line (``command_line``: old names) and the new
    one was not: the command line overrides the YAML files, whatever the names. ``where`` names the
    section in messages (``ttt``, or e.g. ``<checkpoint>: ttt``)."""
    raw = _plain(ttt)
    old = raw.pop("layers", None)
    if old is not None:
        new = raw.get("layer_indices")
        if new is not None and list(new) != list(old) and "layers" not in command_line:
            raise bad(f"{where}.layers", old, f"deprecated name of {where}.layer_indices, which is set to "
                                              f"{list(new)}: set only {where}.layer_indices")
        _warn_renamed(where, "layers", "layer_indices", " (indices of the Moshi layers that get TTT)")
        raw["layer_indices"] = old
    old = raw.pop("window", None)
    if old is not None:
        new = raw.get("ttt_layer_attention_window")
        if (new is not None and new != old and new != _TTT_DEFAULTS.ttt_layer_attention_window
                and "window" not in command_line):
            raise bad(f"{where}.window", old, f"deprecated name of {where}.ttt_layer_attention_window, which is "
                                              f"set to {new}: set only {where}.ttt_layer_attention_window")
        _warn_renamed(where, "window", "ttt_layer_attention_window",
                      " (frames of local attention in the layers that carry a hybrid / cache_replacement TTT layer)")
        raw["ttt_layer_attention_window"] = old
    old = raw.pop("layer", None)
    if old is not None and not isinstance(old, Mapping):
        raise bad(f"{where}.layer", old, f"deprecated name of {where}.ttt_layer, a mapping of TTT layer settings")
    old = {k: v for k, v in (old or {}).items() if v is not None}  # null: not set (see DeprecatedTTTLayer)
    if old:
        merged = dict(raw.get("ttt_layer") or {})
        for key, value in old.items():
            if (merged.get(key) is not None and merged[key] != value
                    and merged[key] != _LAYER_DEFAULTS.get(key, merged[key])
                    and "layer" not in command_line):
                raise bad(f"{where}.layer.{key}", value, f"deprecated name of {where}.ttt_layer.{key}, which is set "
                                                         f"to {merged[key]}: set only {where}.ttt_layer.{key}")
            merged[key] = value
        section = _section(where)
        _warn_renamed(where, "layer", "ttt_layer", f" ({section}.layer.KEY is {section}.ttt_layer.KEY: the TTT "
                                                   "layer's settings)")
        raw["ttt_layer"] = merged
    layer = raw.get("ttt_layer")
    if where != "ttt" and isinstance(layer, Mapping) and layer and "rule" not in layer:
        # a stored config (checkpoint, export) written before ttt.ttt_layer.rule existed (2026-12): it trained
        # Sun et al.'s rule with the settings it recorded, which the newer default rule must not reinterpret
        raw["ttt_layer"] = {**layer, "rule": "minibatch_gd"}
    return raw


def _typed(cls: type, raw: dict, where: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), raw))
    except OmegaConfBaseException as exn:
        key = f"{where}.{exn.full_key}" if exn.full_key else where
        first = str(exn.msg or exn).splitlines()[0]
        if type(exn).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
            raise ConfigError(f"{key}: no such key (keys: python -m moshi_ttt.config explain {_section(where)})") from exn
        raise ConfigError(f"{key}: {first}") from exn
    except ValueError as exn:  # TTTConfig's own range checks name ttt.ttt_layer.<field>
        raise ConfigError(str(exn).splitlines()[0]) from exn


def ttt_settings(ttt, where: str = "ttt") -> TTTVariantConfig:
    """The ``ttt`` section (composed, plain dict, None = no TTT) as a checked ``TTTVariantConfig``
    whose ``ttt_layer`` is a ``TTTConfig``; old key names are moved with a warning."""
    if isinstance(ttt, TTTVariantConfig):
        return ttt
    raw = rename_ttt_keys(ttt if ttt is not None else {"variant": "none"}, where)
    if isinstance(raw.get("ttt_layer"), TTTConfig):
        raw["ttt_layer"] = dataclasses.asdict(raw["ttt_layer"])
    settings = _typed(TTTVariantConfig, raw, where)
    if settings.hybrid_alpha_init is not None:
        warnings.warn(f"{where}.hybrid_alpha_init is deprecated and ignored: hybrid now keeps attention at full "
                      "strength and adds the gated TTT read (step 0 is the frozen model)", ConfigDeprecationWarning,
                      stacklevel=2)
        settings.hybrid_alpha_init = None
    if settings.memory_slots is not None:
        raise bad(f"{where}.memory_slots", settings.memory_slots,
                  "kv_slots no longer reads fixed probe slots; each query reads its own slot f_W(q) (remove it)")
    return settings


def ttt_dict(ttt, where: str = "ttt") -> dict[str, Any]:
    """``ttt_settings`` as a plain dict under the current names only (what checkpoints and exports store)."""
    out = dataclasses.asdict(ttt_settings(ttt, where))
    for key in TTT_DEPRECATED:
        out.pop(key, None)
    return out


def model_settings(model, where: str = "model") -> ModelConfig:
    """The ``model`` section (composed or a plain dict) as a checked ``ModelConfig``; keys it does not
    set take the schema's defaults, ``lm_kwargs`` stays a free dict."""
    if isinstance(model, ModelConfig):
        return model
    return _typed(ModelConfig, _plain(model), where)


def model_dict(model, where: str = "model") -> dict[str, Any]:
    return dataclasses.asdict(model_settings(model, where))


def apply_renames(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Move renamed keys of a composed run config to their new names, in place (warning for each),
    so that everything written from it (config.yaml, checkpoints, exports) holds only the new names.
    The old fields stay in the composed config, null. ``overrides``: the command line it was composed
    with (None: this ``python train.py``'s, from Hydra), where an old name beats a new one from YAML."""
    ttt = OmegaConf.select(cfg, "ttt")
    if ttt is None:
        return
    raw = _plain(ttt)
    layer = raw.get("layer") or {}
    if raw.get("layers") is None and raw.get("window") is None and all(v is None for v in layer.values()):
        return
    renamed = rename_ttt_keys(raw, "ttt", _old_names_on_command_line(overrides))
    with open_dict(cfg):
        cfg.ttt.layer_indices = renamed["layer_indices"]
        cfg.ttt.ttt_layer_attention_window = renamed["ttt_layer_attention_window"]
        for key, value in renamed["ttt_layer"].items():
            cfg.ttt.ttt_layer[key] = value
        cfg.ttt.layers = None
        cfg.ttt.window = None
        for key in cfg.ttt.layer:
            cfg.ttt.layer[key] = None


def _old_names_on_command_line(overrides: list[str] | None = None) -> frozenset[str]:
    """Old ``ttt`` names among ``overrides`` (None: this ``python train.py``'s overrides, none outside
    Hydra's main) whose new name is not among them."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    given = {k.split(".")[1] for k in keys if k.startswith("ttt.")}
    return frozenset(old for old, new in TTT_RENAMED.items() if old in given and new not in given)
