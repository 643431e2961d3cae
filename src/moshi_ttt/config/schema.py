"""Typed schema of ``python train.py``'s config: the one place that sets defaults and types.

Registered with Hydra's ConfigStore (``moshi_ttt.config.store``) as the first entry of
``conf/train.yaml``'s defaults, so every YAML file and command-line override is merged into
these dataclasses and a wrong type fails at composition, naming the key. The string under each
field is its documentation: ``python -m moshi_ttt.config explain KEY`` prints it.

The ``model`` and ``ttt`` groups are not typed here yet (``Any``): their settings are checked by
``moshi_ttt.models.build`` and ``moshi_ttt.ttt.TTTConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

# A value for an int field that the curriculum replaces: see ``moshi_ttt.config.store.run_steps``.
RUN_STEPS = "${moshi_ttt.run_steps:100}"


@dataclass
class LossConfig:
    """Moshi's fine-tuning loss (text CE + audio CE), weighted as moshi-finetune weights it.

    Also the runtime settings of ``moshi_loss`` (``moshi_ttt.training.loss`` imports it).
    """

    text_padding_weight: float = 0.5
    """Weight of text positions whose target is a padding token (Moshi's inner monologue is mostly padding)."""
    first_codebook_weight: float = 100.0
    """Weight of the first (semantic) audio codebook relative to the 7 acoustic ones."""
    text_weight: float = 1.0
    """Weight of the text loss in the total."""
    audio_weight: float = 1.0
    """Weight of the audio loss in the total."""


@dataclass
class OptimConfig:
    """AdamW on the trainable parameters, linear warmup then cosine decay (per stage under a curriculum).

    Also the runtime settings of ``MoshiTTTModule`` (``moshi_ttt.training.module`` imports it).
    """

    lr: float = 1e-3
    """Peak learning rate (a curriculum stage's ``lr`` replaces it during that stage)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas, two values in [0, 1)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``lr`` (without a curriculum; stages have their own)."""
    total_steps: int = 1000
    """Step at which the cosine decay reaches ``min_lr_ratio * lr`` (conf/train.yaml: trainer.max_steps)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``, in [0, 1]."""
    group_lr_scale: dict[str, float] = field(default_factory=dict)
    """LR multipliers by parameter-name substring (first match wins), e.g. ``{gate: 10.0}``."""
    opening_lr_scale: float = 10.0
    """LR multiple for what opens a memory's path (gates, read projections, inner-lr projections: each TTT
    module's ``opening_parameters()``), trained without weight decay: from zero or a small gate they must
    move far before the memory changes the output (ttt-video-dit: 10x)."""


@dataclass
class SyntheticConfig:
    """Random structured token conversations written once into ``data.train_shards`` (runs anywhere)."""

    num_samples: int = 64
    """Conversations to write."""
    num_frames: Any = field(default_factory=lambda: [48, 160])
    """Frames per conversation: a number, or [min, max] drawn uniformly."""
    card: int = "${model.lm_kwargs.card}"  # type: ignore[assignment]
    """Audio vocabulary size (the model's ``card``)."""
    text_card: int = "${model.lm_kwargs.text_card}"  # type: ignore[assignment]
    """Text vocabulary size (the model's ``text_card``)."""
    samples_per_shard: int = 8
    """Conversations per tar shard."""
    seed: int = 0
    """Seed of the generator (part of the shard directory's name)."""


@dataclass
class DataConfig:
    """Token shards -> [B, 17, T] batches (``moshi_ttt.training.datamodule.TokenDataModule``)."""

    _target_: str = "moshi_ttt.training.datamodule.TokenDataModule"
    """The DataModule class Hydra instantiates."""
    _convert_: str = "all"
    """Hydra passes plain Python containers to the DataModule."""
    train_shards: Any = MISSING
    """Training shards: a directory (its index.json, else *.tar), a glob, a brace pattern or a list."""
    val_shards: Any = None
    """Validation shards (same forms); null: no validation."""
    seq_len: int = 188
    """Frames per training sequence without a curriculum (188 = 15 s at 12.5 Hz); stages set their own."""
    batch_size: int = 1
    """Sequences per batch and rank without a curriculum; stages set their own."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    seed: int = "${seed}"  # type: ignore[assignment]
    """Seed of shard order, shuffling and crops (follows the run's seed)."""
    resampled: bool = True
    """Draw shards with replacement forever (true) or go through them in epochs without repeats (false)."""
    shuffle_buffer: int = 64
    """Samples held for shuffling inside a stream (1: no shuffling)."""
    random_crop: bool = True
    """Crop a random window of longer conversations (false: their start)."""
    min_frames: int = 1
    """Conversations shorter than this are skipped (and counted)."""
    val_batches: int = 2
    """Validation batches per validation run."""
    synthetic: SyntheticConfig | None = None
    """When set, synthetic shards are generated into train_shards before training."""
    verify_checksums: bool = True
    """Check each shard's sha256 against index.json when a process first opens it (a mismatch is skipped
    and counted); false skips the check (one extra read of each shard per process)."""


@dataclass
class Stage:
    """One curriculum stage: a sequence length trained for a number of optimizer steps."""

    name: str = MISSING
    """Stage name (checkpoints/stage<i>-<name>-end.ckpt is written at its end)."""
    seconds: float = MISSING
    """Sequence length in seconds of audio (frames = ceil(seconds * 12.5))."""
    steps: int = MISSING
    """Optimizer steps of the stage."""
    batch_size: int = 1
    """Sequences per batch and rank during the stage."""
    accumulate: int = 1
    """Batches accumulated per optimizer step (1 with DeepSpeed)."""
    lr: float | None = None
    """Peak learning rate of the stage; null: optim.lr."""
    warmup_steps: int = 0
    """Linear warmup steps at the start of the stage, at most ``steps``."""
    min_lr_ratio: float = 0.1
    """Learning rate at the stage's end as a fraction of its peak, in [0, 1]."""
    ttt_mini_batch_size: int | None = None
    """Must equal ttt.layer.mini_batch_size when set; null: the variant's own setting."""
    attention_window: int | None = None
    """Frames of local attention during the stage (layers that support it); null: the model's setting."""
    window: int | None = None
    """Deprecated name of ``attention_window`` (still accepted, with a warning)."""
    packing: bool = False
    """Pack consecutive conversations shorter than the stage into one sequence."""
    reset_at_boundaries: bool = True
    """With packing: reset the TTT state where a packed conversation starts."""

    @property
    def frames(self) -> int:
        from moshi_ttt.data.shards import seconds_to_frames

        return seconds_to_frames(self.seconds)


@dataclass
class CurriculumConfig:
    """The progressive curriculum (15 s -> 5 min -> 30 min); no stages: one endless stage of data.seq_len."""

    stages: list[Stage] = field(default_factory=list)
    """Stages in order; each is one Lightning epoch with its own loaders; the run ends after the last."""


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.pytorch.Trainer`` (the run passes logger, callbacks and plugins itself)."""

    _target_: str = "lightning.pytorch.Trainer"
    """The Trainer class Hydra instantiates."""
    accelerator: str = "cpu"
    """cpu | gpu (CUDA) | auto."""
    devices: Any = 1
    """Devices per node: a number, -1 for all, or a list of indices."""
    num_nodes: int = 1
    """Nodes (under SLURM, Lightning reads the allocation)."""
    precision: Any = "32-true"
    """32-true | bf16-mixed | 16-mixed | bf16-true ..."""
    max_steps: int = RUN_STEPS  # type: ignore[assignment]
    """Optimizer steps of the run: 100 by default; under a curriculum it is the sum of the stages' steps
    and cannot be set to anything else (change curriculum.stages.N.steps)."""
    log_every_n_steps: int = 1
    """Steps between metric logs."""
    val_check_interval: int | float | None = 50
    """Steps between validation runs without a curriculum (a curriculum validates at each stage end)."""
    check_val_every_n_epoch: int | None = None
    """Epochs between validation runs (null: by val_check_interval)."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training starts."""
    gradient_clip_val: float | None = 1.0
    """Gradient norm clip; null: no clipping."""
    accumulate_grad_batches: int = 1
    """Batches accumulated per optimizer step without a curriculum."""
    enable_model_summary: bool = False
    """Print Lightning's model summary at start."""
    default_root_dir: str = "${paths.run_dir}"
    """Lightning's root directory for anything it writes itself."""
    strategy: Any = "auto"
    """auto, or a strategy config with a _target_ (DDP, DeepSpeed: see conf/trainer/)."""


@dataclass
class PathsConfig:
    """Where a run writes."""

    output_root: str = "${oc.env:MOSHI_TTT_OUTPUT,outputs}"
    """Everything a run writes lives under this directory (environment: MOSHI_TTT_OUTPUT)."""
    run_dir: str = "${paths.output_root}/runs/${run_name}"
    """The run's directory: checkpoints, logs, config.yaml."""
    data_dir: str = "${paths.output_root}/data"
    """Data the run generates itself (synthetic shards)."""


@dataclass
class ResumeConfig:
    """What a resume may change (moshi_ttt.training.resume_config)."""

    allow_config_change: bool = False
    """Resume although the checkpoint was trained with different result-changing settings (optimizer, LR,
    curriculum, data, model/variant, seed, loss); the run logs every change. false: such a resume fails
    before training and names the keys."""


@dataclass
class TrainConfig:
    """``python train.py``: the root of the config."""

    run_name: str = "default"
    """Names the run directory, its checkpoints and the W&B run id: the same name resumes the same run."""
    seed: int = 0
    """Seed of model init, data order and every random draw."""
    ckpt_path: str | None = "last"
    """last: resume from <run_dir>/checkpoints/last.ckpt when it exists; a path: resume from it (a path that
    does not exist yet starts fresh); null: never resume."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: dict[str, Any] = field(default_factory=dict)
    """Loggers by name, each a config with a _target_ (conf/logger/: csv, wandb, none)."""
    callbacks: dict[str, Any] = field(default_factory=dict)
    """Lightning callbacks by name, each a config with a _target_; add one with +callbacks.NAME._target_=...,
    remove one with callbacks.NAME=null."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = None
    """The frozen Moshi: conf/model/ (not typed here yet; checked when the model is built)."""
    ttt: Any = None
    """The TTT variant and its layers: conf/ttt/ (not typed here yet; checked by moshi_ttt.ttt.TTTConfig)."""


#: Documentation of named components inside the untyped dict groups, for ``explain``.
GROUP_DOCS = {
    "callbacks.model_checkpoint": "Lightning's ModelCheckpoint: step<N>.ckpt every every_n_train_steps steps "
                                  "(a positive number, or null: none) and last.ckpt.",
    "callbacks.resume_state": "Saves and restores what an exact resume needs besides the model (RNG, data position).",
    "callbacks.progress": "One plain log line every every_n_steps optimizer steps.",
    "callbacks.preemption": "On signal_name (SIGUSR1 from SLURM): checkpoint, then requeue the job when requeue.",
    "callbacks.ttt_health": "Logs TTT gates, fast-weight norms and learning rates every every_n_steps steps.",
    "logger.csv": "Lightning's CSVLogger under <run_dir>/csv (one version_N per attempt).",
    "logger.wandb": "W&B, offline unless credentials exist; the run id is run_name, so a resume continues it.",
}
