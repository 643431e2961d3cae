"""``validate_config(cfg)``: every check that needs neither the model nor a training step.

Hydra already rejects wrong types (the schema); this adds ranges and cross-key rules. Each
error is a ``ConfigError`` whose message names the key, the value and what is allowed. It
first moves renamed ``ttt`` keys to their new names in ``cfg`` (``moshi_ttt.config.groups``),
so that the run, its config.yaml and its checkpoints see only the new names.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moshi_ttt.config.errors import ConfigError, bad
from moshi_ttt.config.groups import apply_renames, model_settings, ttt_settings
from moshi_ttt.config.schema import DISTILL_TARGETS
from moshi_ttt.config.stages import parse_stages

_RUN_NAME = re.compile(r"^[A-Za-z0-9._=-]{1,128}$")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


class _Checker:
    """Reads resolved values by dotted key and raises ``key=value: allowed`` when a rule fails."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def get(self, key: str, default=None):
        try:
            return OmegaConf.select(self.cfg, key, default=default, throw_on_missing=True)
        except OmegaConfBaseException as exn:
            raise ConfigError(f"{exn.full_key or key}: {str(exn.msg or exn).splitlines()[0]}") from exn

    def require(self, key: str, ok, allowed: str) -> None:
        value = self.get(key)
        if not ok(value):
            raise bad(key, value, allowed)

    def positive_int(self, key: str, none_ok: bool = False) -> None:
        self.require(key, lambda v: (none_ok and v is None) or (_is_int(v) and v > 0),
                     "a positive integer" + (", or null" if none_ok else ""))

    def int_at_least(self, key: str, low: int) -> None:
        self.require(key, lambda v: _is_int(v) and v >= low, f"an integer >= {low}")

    def number(self, key: str, low: float, high: float = math.inf, low_open: bool = False, none_ok=False) -> None:
        def ok(v):
            if none_ok and v is None:
                return True
            return _is_number(v) and (v > low if low_open else v >= low) and v <= high

        span = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        self.require(key, ok, f"a finite number {span}" + (", or null" if none_ok else ""))


def validate_config(cfg: DictConfig) -> None:
    """Catch bad settings before any model is built or any step runs; raises ``ConfigError``."""
    c = _Checker(cfg)
    _check_resolves(cfg)
    apply_renames(cfg)
    c.require("run_name", lambda v: isinstance(v, str) and bool(_RUN_NAME.match(v)),
              "use 1-128 letters, digits, '.', '_', '-', '=' (it becomes a path and the W&B run id)")
    c.require("run_name", lambda v: v not in (".", ".."), "must name a directory of its own, not '.' or '..'")
    c.require("seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
    _check_loss(c)
    _check_optim(c)
    stages = parse_stages(OmegaConf.to_container(cfg.curriculum, resolve=True).get("stages")
                          if c.get("curriculum") is not None else [])
    _check_trainer(c, stages)
    _check_data(c, stages)
    _check_components(c, "callbacks")
    _check_components(c, "logger")
    _check_ttt(c, stages)
    _check_distill(c, stages)
    model = model_settings(c.get("model"))
    if model.source != "hf":  # hub look-ups happen at load time
        from moshi_ttt.models.loading import locate_checkpoint

        locate_checkpoint(model)


def _check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves and every required value (``???``) is set, named by key."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exn:
        key = exn.full_key or "config"
        if type(exn).__name__ == "MissingMandatoryValue":
            raise ConfigError(f"{key} is not set (it is required: set {key}=...)") from exn
        raise ConfigError(f"{key}: {str(exn.msg or exn).splitlines()[0]}") from exn


def _check_loss(c: _Checker) -> None:
    for key in ("text_padding_weight", "first_codebook_weight", "text_weight", "audio_weight"):
        c.number(f"loss.{key}", 0)
    c.require("loss.audio_weight", lambda v: v + c.get("loss.text_weight") > 0,
              "loss.text_weight and loss.audio_weight cannot both be 0 (nothing would train)")


def _check_optim(c: _Checker) -> None:
    c.number("optim.lr", 0, low_open=True)
    c.number("optim.weight_decay", 0)
    c.require("optim.betas", lambda v: v is not None and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1)")
    c.number("optim.eps", 0, low_open=True)
    c.int_at_least("optim.warmup_steps", 0)
    c.positive_int("optim.total_steps")
    c.number("optim.min_lr_ratio", 0, 1)
    c.number("optim.opening_lr_scale", 0, low_open=True)
    for name in c.get("optim.group_lr_scale") or {}:
        c.number(f"optim.group_lr_scale.{name}", 0)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _group_choice(group: str) -> str | None:
    """The option picked for a config group (``trainer=deepspeed_zero2``), when Hydra's main runs."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def _check_trainer(c: _Checker, stages) -> None:
    if stages:
        total = sum(s.steps for s in stages)
        c.require("trainer.max_steps", lambda v: v == total,
                  f"under a curriculum the curriculum sets the run length, {total} steps (the sum of "
                  "curriculum.stages.*.steps); leave trainer.max_steps unset or change the stages' steps")
    else:
        c.require("trainer.max_steps", lambda v: _is_int(v) and v > 0, "a positive integer")
    c.positive_int("trainer.num_nodes")
    c.positive_int("trainer.log_every_n_steps")
    c.positive_int("trainer.accumulate_grad_batches")
    c.number("trainer.gradient_clip_val", 0, none_ok=True)
    c.number("trainer.val_check_interval", 0, low_open=True, none_ok=True)
    c.int_at_least("trainer.num_sanity_val_steps", -1)
    strategy = c.get("trainer.strategy")
    target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else str(strategy)
    deepspeed = "deepspeed" in target.lower()
    if c.get("trainer.accelerator") in ("gpu", "cuda") and not _cuda_available():
        choice = _group_choice("trainer")
        name = f"trainer={choice}" if choice else "trainer.accelerator"
        instead = ("trainer=deepspeed_cpu_sim runs the same DeepSpeed ZeRO code on CPU processes" if deepspeed else
                   "trainer=cpu runs on CPU (trainer=ddp_sim: DDP over CPU processes)")
        raise ConfigError(f"{name} (trainer.accelerator=gpu) needs CUDA GPUs and this machine has none; {instead}")
    if deepspeed and any(s.accumulate > 1 for s in stages):
        i = next(i for i, s in enumerate(stages) if s.accumulate > 1)
        raise bad(f"curriculum.stages.{i}.accumulate", stages[i].accumulate,
                  "must be 1 with DeepSpeed (its engine fixes gradient accumulation at start-up): use more GPUs "
                  "or a larger batch_size")


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_data(c: _Checker, stages) -> None:
    c.positive_int("data.seq_len")
    c.positive_int("data.batch_size")
    c.int_at_least("data.num_workers", 0)
    c.positive_int("data.shuffle_buffer")
    c.positive_int("data.min_frames")
    c.positive_int("data.val_batches")
    synthetic = c.get("data.synthetic")
    if synthetic is not None:
        c.require("data.synthetic.num_frames", lambda v: _frames_range(v) is not None,
                  "a positive number of frames, or [min, max] with 0 < min <= max")
        c.positive_int("data.synthetic.num_samples")
        c.positive_int("data.synthetic.samples_per_shard")
    sources = _check_sources(c, stages)
    min_frames = c.get("data.min_frames")
    for key, shards in sources.items():
        if synthetic is not None and shards == c.get("data.train_shards"):
            longest, origin = _frames_range(synthetic.num_frames)[1], "data.synthetic.num_frames"
        else:
            longest, origin = _longest_in_index(shards)
        if longest is not None and min_frames > longest:
            raise bad("data.min_frames", min_frames,
                      f"longer than every conversation in {key} (at most {longest} frames, from {origin}): "
                      "every sample would be skipped")


def _check_sources(c: _Checker, stages) -> dict[str, object]:
    """The training sources (``data.sources``, else ``data.train_shards``) and every stage's mixture:
    names, weights > 0, shards that exist (generated ones excepted), a train_shards that some source
    reads. Returns the config key of each source's shards -> its value."""
    from moshi_ttt.data.shards import ShardFormatError, resolve_shards

    train_shards = c.get("data.train_shards")
    sources = c.get("data.sources") or {}
    if not sources:
        if train_shards is None:
            raise ConfigError("data.train_shards is not set (a shard directory, glob, brace pattern or list; or name "
                              "several sources in data.sources)")
        names = {"train": "data.train_shards"}
    else:
        names = {}
        generated = train_shards if c.get("data.synthetic") is not None else None
        for name in sources:
            if not _SOURCE_NAME.match(str(name)):
                raise ConfigError(f"data.sources.{name}: a source name is 1-64 letters, digits, '.', '_' or '-' "
                                  "(it names the metric data/NAME/samples)")
            key = f"data.sources.{name}"
            spec = c.get(key)
            if not hasattr(spec, "items"):
                raise bad(key, spec, "a source is {shards: ..., weight: ...}")
            unknown = sorted(set(spec) - {"shards", "weight"})
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}: unknown key; a source has shards and weight")
            if spec.get("weight") is not None:
                c.require(f"{key}.weight", lambda v: _is_number(v) and v > 0,
                          "a weight > 0 (the source's share of the sequences is weight / the sum of the weights)")
            shards = c.get(f"{key}.shards")
            if shards is None:
                raise ConfigError(f"{key}.shards is not set (a shard directory, glob, brace pattern or list)")
            if generated is None or shards != generated:  # synthetic shards are written at start-up
                try:
                    resolve_shards(OmegaConf.to_container(shards) if isinstance(shards, ListConfig) else shards)
                except (FileNotFoundError, ShardFormatError) as exn:
                    raise bad(f"{key}.shards", shards, str(exn).splitlines()[0]) from exn
            names[str(name)] = f"{key}.shards"
        if train_shards is not None and all(c.get(f"data.sources.{n}.shards") != train_shards for n in sources):
            raise bad("data.train_shards", train_shards,
                      "no source of data.sources reads it: name it in one (data.sources.NAME.shards: "
                      "${data.train_shards}) or leave it unset")
    for i, stage in enumerate(stages):
        for name, weight in (stage.sources or {}).items():
            if name not in names:
                raise bad(f"curriculum.stages.{i}.sources.{name}", weight,
                          f"no source {name!r} in data.sources (it has: {', '.join(names)})")
    return {key: c.get(key) for key in names.values()}


def _frames_range(value) -> tuple[int, int] | None:
    if _is_int(value):
        return (value, value) if value > 0 else None
    if hasattr(value, "__len__") and len(value) == 2 and all(_is_int(v) for v in value) and 0 < value[0] <= value[1]:
        return int(value[0]), int(value[1])
    return None


def _longest_in_index(train_shards) -> tuple[int | None, str | None]:
    """An upper bound on a conversation's frames from each directory's index.json (a shard's
    total frames bound each of its samples), or (None, None) when some source has no index."""
    sources = [train_shards] if isinstance(train_shards, str) else list(train_shards or [])
    longest = 0
    for source in sources:
        index = Path(str(source)) / "index.json"
        if not index.is_file():
            return None, None
        try:
            shards = json.loads(index.read_text())["shards"]
            longest = max([longest, *(int(s["num_frames"]) for s in shards)])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None  # an unreadable index is reported, naming the file, when the shards are opened
    return (longest, "the shards' index.json") if sources else (None, None)


def _check_components(c: _Checker, group: str) -> None:
    """Named callbacks / loggers: a ``_target_`` that imports, and only arguments it takes."""
    from hydra.utils import get_object

    for name, spec in (c.get(group) or {}).items():
        where = f"{group}.{name}"
        if spec is None:
            continue
        if not hasattr(spec, "get") or not spec.get("_target_"):
            raise bad(where, spec, "a config with a _target_ (the class to build), or null to leave it out")
        try:
            target = get_object(str(spec["_target_"]))
        except Exception as exn:  # noqa: BLE001 - Hydra wraps import errors in several types
            raise bad(f"{where}._target_", spec["_target_"], f"cannot be imported ({exn.__class__.__name__})") from exn
        params = inspect.signature(target).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in spec if not str(k).startswith("_") and k not in params]
            if unknown:
                raise ConfigError(f"{where}.{unknown[0]}: {target.__name__} takes no argument {unknown[0]!r}; it "
                                  f"takes {', '.join(p for p in params if p not in ('self', 'args', 'kwargs'))}")
        for key in spec:
            if str(key).startswith("every_n_"):
                c.positive_int(f"{where}.{key}", none_ok=True)


def _check_ttt(c: _Checker, stages) -> None:
    from moshi_ttt.models.variants import variant_for, variant_names
    from moshi_ttt.ttt.config import check_stage_mini_batch

    ttt = ttt_settings(c.get("ttt"))  # types, unknown keys and TTTConfig's ranges, named ttt.<key>
    if ttt.variant not in variant_names():  # the registered variants (moshi_ttt.models.variants)
        raise bad("ttt.variant", ttt.variant, f"one of {', '.join(variant_names())}")
    if ttt.variant == "none":
        return
    for key in ("default_num_layers", "ttt_layer_attention_window"):
        c.positive_int(f"ttt.{key}")
    variant_for(ttt).check()  # the variant's own rules (cache_replacement: ttt.memory_read)
    _check_kernel(ttt)
    for i, stage in enumerate(stages):  # the one rule, shared with the layers' configure_for_stage
        try:
            check_stage_mini_batch(stage.ttt_mini_batch_size, ttt.ttt_layer.mini_batch_size,
                                   f"curriculum.stages.{i}.ttt_mini_batch_size")
        except ValueError as exn:
            raise ConfigError(str(exn)) from exn


def _check_kernel(ttt) -> None:
    """``ttt.ttt_layer.kernel=fla`` asked for by name must be able to run: fla installed, a delta rule read
    at lag 0 (not cache_replacement's lagged read), a key that fits its limit. (CUDA is checked when the
    layer first runs: configs are composed on login nodes without GPUs.)"""
    from moshi_ttt.ttt import fla_kernels

    layer = ttt.ttt_layer.resolved()
    if layer.rule != "delta" or layer.kernel != "fla":
        return
    why = fla_kernels.fla_import_error()
    if why is None and ttt.variant == "cache_replacement":
        why = "cache_replacement reads its memory at a lag, which fla does not compute (use kernel=auto)"
    if why is None and layer.head_dim is not None and layer.head_dim + 1 > fla_kernels.MAX_KEY_DIM:
        why = f"head_dim + 1 = {layer.head_dim + 1} > {fla_kernels.MAX_KEY_DIM}, fla's key-dim limit"
    if why:
        raise bad("ttt.ttt_layer.kernel", "fla", f"auto or torch here: {why}")


def _check_distill(c: _Checker, stages) -> None:
    """``loss.distill`` ranges; where a teacher runs, its window covers every student window."""
    c.number("loss.distill.weight", 0)
    c.number("loss.distill.temperature", 0, low_open=True)
    c.positive_int("loss.distill.teacher_window", none_ok=True)
    c.require("loss.distill.target", lambda v: v in DISTILL_TARGETS, f"one of {', '.join(DISTILL_TARGETS)}")
    weight = c.get("loss.distill.weight")
    windows = [stages[i].attention_window for i in stages_with(stages, weight)]
    if not stages and weight > 0:
        windows = [None]
    if not windows:
        return
    from moshi_ttt.config.groups import model_dict
    from moshi_ttt.models.insert import student_windows
    from moshi_ttt.models.loading import lm_kwargs_for

    lm = lm_kwargs_for(model_dict(c.get("model")))
    context = lm.get("context")
    teacher = c.get("loss.distill.teacher_window") or context
    if teacher is None:
        return  # unbounded attention covers every window
    ttt = ttt_settings(c.get("ttt"))
    for index, stage_window in zip(stages_with(stages, weight) if stages else [None], windows):
        for key, window in student_windows(ttt, int(lm.get("num_layers", 1)), context, stage_window).items():
            if window is not None and window <= teacher:
                continue
            where = f" in curriculum.stages.{index}" if index is not None else ""
            need = "null (unbounded, as the student)" if window is None else f">= {window}"
            raise bad("loss.distill.teacher_window", c.get("loss.distill.teacher_window"),
                      f"the teacher would see {teacher} frames, less than the student{where} "
                      f"({key}: {'unbounded' if window is None else window}); the teacher_window must be {need} "
                      f"(null: the model's context, {context})")


def stages_with(stages, weight: float) -> list[int]:
    """Indices of the stages that run a teacher (their distill_weight, else ``weight``, > 0)."""
    return [i for i, s in enumerate(stages) if (s.distill_weight if s.distill_weight is not None else weight) > 0]

