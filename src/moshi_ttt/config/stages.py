"""Curriculum stages from plain dicts: types, ranges and the deprecated ``window`` name.

Used by ``Curriculum.from_config`` (training, plan) and by ``validate_config``, so a stage is
read the same way everywhere and every error names ``curriculum.stages.<i>.<key>``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import fields

from moshi_ttt.config.errors import ConfigError, bad
from moshi_ttt.config.schema import Stage

REQUIRED = ("name", "seconds", "steps")
#: old name -> new name; the old one still works and warns.
RENAMED = {"window": "attention_window"}


class ConfigDeprecationWarning(FutureWarning):
    """A setting under an old name (FutureWarning: shown to users by default)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def parse_stage(raw: dict, index: int) -> Stage:
    """One validated stage; errors name ``curriculum.stages.<index>.<key>``."""
    where = f"curriculum.stages.{index}"
    if not isinstance(raw, dict):
        raise bad(where, raw, "a stage is a mapping with at least name, seconds and steps")
    raw = {k: v for k, v in raw.items() if v != "???"}  # MISSING in the typed config = not given
    unknown = sorted(set(raw) - {f.name for f in fields(Stage)})
    if unknown:
        known = ", ".join(f.name for f in fields(Stage) if f.name not in RENAMED)
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a stage has: {known}")
    for old, new in RENAMED.items():
        if raw.get(old) is None:
            raw.pop(old, None)
            continue
        value = raw.pop(old)
        if raw.get(new) is not None and raw[new] != value:
            raise bad(f"{where}.{old}", value, f"deprecated name of {where}.{new}, which is set to {raw[new]}: "
                                               f"set only {where}.{new}")
        warnings.warn(f"{where}.{old} is deprecated: use {where}.{new} (same meaning)", ConfigDeprecationWarning,
                      stacklevel=3)
        raw[new] = value
    for key in REQUIRED:
        if raw.get(key) is None:
            raise ConfigError(f"{where}.{key} is required (a stage needs {', '.join(REQUIRED)})")

    def check(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise bad(f"{where}.{key}", raw.get(key), allowed)

    get = raw.get
    check("name", isinstance(get("name"), str) and get("name") != "" and "/" not in get("name"),
          "a non-empty name without '/' (it names a checkpoint file)")
    check("seconds", _is_number(get("seconds")) and get("seconds") > 0, "a positive number of seconds")
    for key in ("steps", "batch_size", "accumulate"):
        if key in raw:
            check(key, _is_int(get(key)) and get(key) > 0, "a positive integer")
    if get("lr") is not None:
        check("lr", _is_number(get("lr")) and get("lr") > 0, "a positive learning rate, or null for optim.lr")
    if "warmup_steps" in raw:
        check("warmup_steps", _is_int(get("warmup_steps")) and 0 <= get("warmup_steps") <= get("steps"),
              f"an integer in [0, steps={get('steps')}]")
    if "min_lr_ratio" in raw:
        check("min_lr_ratio", _is_number(get("min_lr_ratio")) and 0 <= get("min_lr_ratio") <= 1, "a number in [0, 1]")
    if get("distill_weight") is not None:
        check("distill_weight", _is_number(get("distill_weight")) and get("distill_weight") >= 0,
              "a finite number >= 0 (0: no teacher in this stage), or null for loss.distill.weight")
    for key in ("ttt_mini_batch_size", "attention_window"):
        if get(key) is not None:
            check(key, _is_int(get(key)) and get(key) > 0, "a positive integer, or null")
    for key in ("packing", "reset_at_boundaries"):
        if key in raw:
            check(key, isinstance(get(key), bool), "true or false")
    if get("sources") is not None:
        sources = get("sources")
        check("sources", isinstance(sources, dict), "source name -> weight (sources of data.sources), or {} for all")
        for name, weight in sources.items():
            if not (_is_number(weight) and weight > 0):
                raise bad(f"{where}.sources.{name}", weight, "a weight > 0 (its share of the stage's sequences is "
                                                             "weight / the sum of the stage's weights)")
        raw["sources"] = {str(k): float(v) for k, v in sources.items()}
    return Stage(**raw)


def parse_stages(stages) -> list[Stage]:
    return [parse_stage(dict(raw) if hasattr(raw, "items") else raw, i) for i, raw in enumerate(stages or [])]
