"""A resume continues the run it resumes: refuse a config that would train something else.

Every checkpoint holds the resolved run config (``moshi_ttt_config``). Resuming under a
config that differs in anything that changes what is trained (optimizer, learning rates,
curriculum, data, model and variant settings, seed, loss) would silently splice two different
runs into one curve, so it fails before training and names the keys, unless
``resume.allow_config_change=true``, in which case the run logs every change. Keys that only
say where a run writes, how it logs or on how many devices it runs are not compared.
"""

from __future__ import annotations

import dataclasses
import logging

from moshi_ttt.config.errors import ConfigError
from moshi_ttt.config.schema import LossConfig, Stage

logger = logging.getLogger("moshi_ttt")

# Prefixes (dotted) of keys that may change between attempts of one run.
NOT_COMPARED = (
    "run_name", "ckpt_path", "resume", "paths", "logger", "callbacks", "hydra",
    "model.device",
    "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.accelerator", "trainer.max_steps",
    "trainer.log_every_n_steps", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.default_root_dir", "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.num_sanity_val_steps",
)


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        out = {}
        for i, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}.{i}"))
        return out
    return {prefix: list(obj) if isinstance(obj, tuple) else obj}


def _compared(key: str) -> bool:
    return not any(key == p or key.startswith(p + ".") for p in NOT_COMPARED)


_MISSING = "<absent>"


def _canonical(cfg: dict, where: str = "run") -> dict:
    """``model`` and ``ttt`` read through the schema: the current key names (a checkpoint written before a
    rename compares as the new names) and every default filled in (a key added to the schema since then
    compares as its default; ``where`` names a stored config, which also reads a memory written before
    ``ttt.ttt_layer.rule`` existed as the rule it trained)."""
    from moshi_ttt.config.groups import model_dict, ttt_dict

    out = dict(cfg)
    for key, read in (("model", model_dict), ("ttt", ttt_dict)):
        if key in out:
            try:
                out[key] = read(out[key], f"{where}: {key}" if where != "run" else key)
            except ConfigError:
                pass  # compared as stored: the difference is named key by key
    if isinstance(out.get("data"), dict) and "sources" not in out["data"]:
        out["data"] = {**out["data"], "sources": {}}  # data.sources came later: none is the single train_shards
    # keys added to the loss and to a stage since (loss.distill, distill_weight) compare as their defaults
    if isinstance(out.get("loss"), dict):
        out["loss"] = _with_defaults(dataclasses.asdict(LossConfig()), out["loss"])
    curriculum = out.get("curriculum")
    if isinstance(curriculum, dict) and isinstance(curriculum.get("stages"), list):
        defaults = {f.name: f.default for f in dataclasses.fields(Stage)
                    if f.default is not dataclasses.MISSING and f.default != "???"}
        defaults.update({f.name: f.default_factory() for f in dataclasses.fields(Stage)
                         if f.default_factory is not dataclasses.MISSING})
        out["curriculum"] = {**curriculum, "stages": [_with_defaults(defaults, s) for s in curriculum["stages"]]}
    return out


def _with_defaults(defaults: dict, stored):
    """``stored`` with the keys it lacks taken from ``defaults`` (nested dicts too)."""
    if not isinstance(stored, dict):
        return stored
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _with_defaults(value, out[key])
    return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """dotted key -> (checkpoint's value, this run's value) for every compared key that differs."""
    old, new = _flatten(_canonical(saved, "checkpoint")), _flatten(_canonical(current))
    return {k: (old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
            if _compared(k) and old.get(k, _MISSING) != new.get(k, _MISSING)}


def check_resume_config(checkpoint: dict, current: dict, ckpt_path: str, allow_change: bool) -> dict[str, tuple]:
    """Raise (naming the keys) when resuming ``checkpoint`` under ``current`` changes the result."""
    saved = checkpoint.get("moshi_ttt_config")
    if saved is None:
        logger.warning("%s holds no run config (written before configs were saved): not compared", ckpt_path)
        return {}
    changes = config_changes(saved, current)
    if not changes:
        return changes
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
    if not allow_change:
        raise ConfigError(
            f"resuming {ckpt_path} with a different config would mix two runs: {listing}. Use the checkpoint's "
            "settings, another run_name (a new run), or resume.allow_config_change=true to continue with the change"
        )
    logger.warning("resume.allow_config_change=true: continuing %s with changed settings: %s", ckpt_path, listing)
    return changes
