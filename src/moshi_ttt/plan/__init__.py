"""Per-GPU memory and throughput planner for a training config, stage by stage.

    python -m moshi_ttt.plan model=moshiko_7b curriculum=long_context trainer=deepspeed_zero3 --gpus 8

composes the same Hydra config as ``train.py`` (same groups, same overrides, from any working
directory), sizes the real model from its constructor on the ``meta`` device (no memory, no
download), and for every curriculum stage estimates what one GPU must hold and how fast it goes.
It prints one column per stage and exits non-zero, naming the stage, the GiB and the biggest
terms, when a stage cannot fit (exit 1) or the config cannot train at all (exit 2).

The parts:

- ``config``: the config as the planner reads it (``compose_config``, ``Strategy``, ``StageSpec``
  from the curriculum, ``Hardware``);
- ``shapes``: the model and TTT layout, from the real constructors on the meta device
  (``ModelShape``, ``TTTShape``);
- ``memory``: the memory model, one named formula per term (its docstring gives the whole model);
- ``flops``: FLOPs per frame and compute time (the throughput model);
- ``comm``: communication per step and the step time it bounds;
- ``estimate``: ``plan_stages`` puts each stage's terms together (``StagePlan``), ``prepare``/``plan``;
- ``suggest``: what would make a failing stage fit;
- ``report``: the table and the header lines; ``cli``: ``python -m moshi_ttt.plan``.
"""

from moshi_ttt.plan.cli import _default_gpus, main
from moshi_ttt.plan.comm import Traffic, link_bytes_per_step, pcie_bytes_per_step, step_time, traffic
from moshi_ttt.plan.config import (
    DEFAULT_CONFIG_DIR,
    DTYPE_BYTES,
    GIB,
    Hardware,
    PlanError,
    StageSpec,
    Strategy,
    _plain,
    compose_config,
    lm_kwargs_for,
    stages_from_config,
    strategy_from_config,
)
from moshi_ttt.plan.estimate import (
    PlanInputs,
    StagePlan,
    plan,
    plan_stages,
    prepare,
    recall_validation_cost,
)
from moshi_ttt.plan.flops import delta_rule_flops, effective_window
from moshi_ttt.plan.memory import depformer_layer_saved, temporal_layer_saved, ttt_saved
from moshi_ttt.plan.report import _describe_distill, _describe_recall, _duration, _rows, describe, render
from moshi_ttt.plan.shapes import (
    ModelShape,
    TTTShape,
    _meta_lm,
    _model_shape,
    _skip_init,
    _ttt_shape,
    model_shape,
    ttt_shape,
)
from moshi_ttt.plan.suggest import suggestions

_effective_window = effective_window  # its name before the split

__all__ = [
    "DEFAULT_CONFIG_DIR", "DTYPE_BYTES", "GIB", "Hardware", "ModelShape", "PlanError", "PlanInputs", "StagePlan",
    "StageSpec", "Strategy", "TTTShape", "Traffic", "compose_config", "delta_rule_flops", "depformer_layer_saved",
    "describe", "effective_window", "link_bytes_per_step", "lm_kwargs_for", "main", "model_shape",
    "pcie_bytes_per_step", "plan", "plan_stages", "prepare", "recall_validation_cost", "render", "stages_from_config",
    "step_time", "strategy_from_config", "suggestions", "temporal_layer_saved", "traffic", "ttt_saved", "ttt_shape",
    "_default_gpus", "_describe_distill", "_describe_recall", "_duration", "_effective_window", "_meta_lm",
    "_model_shape", "_plain", "_rows", "_skip_init", "_ttt_shape",
]
