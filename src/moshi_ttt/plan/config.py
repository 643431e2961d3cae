"""What the planner reads from a composed train config: the strategy, the stages, the cluster.

The stages come from the curriculum as training reads it (``Curriculum.from_config``: the same
parsing, the same frames per stage); the strategy from ``trainer`` (DeepSpeed's ZeRO settings);
the cluster from the command line (``Hardware``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = float(2**30)
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """A config that cannot train at all (nothing trainable, a setting train.py refuses)."""


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def compose_config(overrides: list[str], config_dir: str | Path | None = None):
    """``conf/train.yaml`` composed with ``overrides``, exactly as ``train.py`` would see it (renamed keys
    moved to their new names, as ``train.py``'s validation moves them)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moshi_ttt.config.groups import apply_renames

    config_dir = Path(config_dir or DEFAULT_CONFIG_DIR).resolve()
    if not (config_dir / "train.yaml").exists():
        raise FileNotFoundError(f"--config-dir {config_dir}: no train.yaml there")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    apply_renames(cfg, list(overrides))
    return cfg


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    if node is None:
        return {}
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def lm_kwargs_for(model_cfg: dict) -> dict:
    """``models.loading.lm_kwargs_for``, imported when called: the planner's import stays light."""
    from moshi_ttt.models.loading import lm_kwargs_for as of_model

    return of_model(model_cfg)


def model_dtype_bytes(model_cfg: dict) -> int:
    """Bytes per element of ``model.dtype``: what the frozen base is loaded in without DeepSpeed
    (float32 when unset or unknown)."""
    return DTYPE_BYTES.get(str(model_cfg.get("dtype", "float32")), 4)


# ---------------------------------------------------------------------------------------------
# strategy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    name: str
    deepspeed: bool
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    half: bool  # 16-bit compute (DeepSpeed casts the module to it)
    reduce_bucket: int = 200_000_000
    allgather_bucket: int = 200_000_000
    prefetch_bucket: int = 50_000_000
    max_live: int = 1_000_000_000
    persistence: int = 100_000


def strategy_from_config(trainer_cfg: dict) -> Strategy:
    strategy = trainer_cfg.get("strategy") or {}
    target = str(strategy.get("_target_", "")) if isinstance(strategy, dict) else str(strategy)
    precision = str(trainer_cfg.get("precision", "32-true"))
    half = "16" in precision.split("-")[0]
    if "DeepSpeed" not in target and "deepspeed" not in target:
        name = target.rsplit(".", 1)[-1] or "single device"
        return Strategy(name, False, 0, False, False, half)
    zero = (strategy.get("config") or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        device = (zero.get(key) or {}).get("device", "none")
        return str(device).lower() in ("cpu", "nvme")

    off_opt, off_param = offloaded("offload_optimizer"), offloaded("offload_param") and stage == 3
    name = f"DeepSpeed ZeRO-{stage}" + (" + offload" if off_opt or off_param else "")
    return Strategy(
        name, True, stage, off_opt, off_param, half,
        reduce_bucket=int(zero.get("reduce_bucket_size", 200_000_000)),
        allgather_bucket=int(zero.get("allgather_bucket_size", 200_000_000)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        max_live=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        persistence=int(zero.get("stage3_param_persistence_threshold", 100_000)),
    )


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    index: int
    name: str
    frames: int
    batch_size: int
    accumulate: int
    steps: int
    window: int | None
    ttt_mini_batch_size: int | None
    distill_weight: float = 0.0  # loss.distill's weight in the stage (> 0: a teacher forward every step)


def stage_distill_weight(stage_weight: float | None, weight: float) -> float:
    """The teacher's weight during a stage: the stage's ``distill_weight`` when set, else
    ``loss.distill.weight`` (as ``MoshiTTTModule.distill_weight`` and validation's ``stages_with``
    read it); > 0 means one extra no-grad forward of the frozen base every step."""
    return float(stage_weight if stage_weight is not None else weight)


def stages_from_config(cfg) -> list[StageSpec]:
    """The curriculum's stages, or the single stage ``data.seq_len x data.batch_size``."""
    from omegaconf import OmegaConf

    from moshi_ttt.training.curriculum import Curriculum

    weight = float(OmegaConf.select(cfg, "loss.distill.weight", default=0.0) or 0.0)
    curriculum = Curriculum.from_config(_plain(OmegaConf.select(cfg, "curriculum")))
    if curriculum:
        return [StageSpec(i, s.name, s.frames, s.batch_size, s.accumulate, s.steps, s.attention_window,
                          s.ttt_mini_batch_size, stage_distill_weight(s.distill_weight, weight))
                for i, s in enumerate(curriculum.stages)]
    return [StageSpec(0, "default", int(cfg.data.seq_len), int(cfg.data.batch_size),
                      int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches") or 1),
                      int(cfg.trainer.max_steps), None, None, weight)]


# ---------------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """The cluster the plan is for. ``link_gbs``: collective bus bandwidth per GPU in GB/s (None:
    300 within one node (NVLink), 40 across nodes (InfiniBand)); ``pcie_gbs``: host <-> GPU."""

    gpus: int = 8
    gpu_memory_gib: float = 80.0
    gpu_flops: float = 989e12
    mfu: float = 0.35
    overhead_gib: float = 3.0
    nodes: int = 1
    link_gbs: float | None = None
    pcie_gbs: float = 25.0

    @property
    def link(self) -> float:
        return self.link_gbs or (300.0 if self.nodes <= 1 else 40.0)

