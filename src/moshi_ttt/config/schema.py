"""Typed schema of ``python train.py``'s config: the one place that sets defaults and types.

Registered with Hydra's ConfigStore (``moshi_ttt.config.store``) as the first entry of
``conf/train.yaml``'s defaults, so every YAML file and command-line override is merged into
these dataclasses and a wrong type fails at composition, naming the key. The string under each
field is its documentation: ``python -m moshi_ttt.config explain KEY`` prints it.

``model`` and ``ttt`` are typed too (``ModelConfig``, ``TTTVariantConfig`` whose ``ttt_layer`` is
``moshi_ttt.ttt.TTTConfig``); code that receives them as plain dicts (checkpoints, exports,
tests) reads them through the same dataclasses with ``moshi_ttt.config.groups``. Renamed keys
keep a deprecated field here (default null) that ``moshi_ttt.config.groups`` moves to the new
name with a warning.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from moshi_ttt.ttt.config import TTTConfig

# A value for an int field that the curriculum replaces: see ``moshi_ttt.config.store.run_steps``.
RUN_STEPS = "${moshi_ttt.run_steps:100}"

# ``loss.distill.target``'s values: validation and the teacher read the same list.
DISTILL_TARGETS = ("logits", "hidden")


@dataclass
class DistillConfig:
    """A dense teacher signal (``moshi_ttt.training.distill``): the same frozen base with a wider attention window
    (TTT branches and LoRA off) teaches the student (short window + TTT) at every valid position.

    The teacher runs on the same module (no second copy of the weights), as one extra no-grad forward per step,
    before the student's; its loss is added to Moshi's loss with ``weight`` (a curriculum stage's
    ``distill_weight`` replaces it during that stage).
    """

    weight: float = 0.0
    """Weight of the distillation loss in the total (0: off, no teacher forward); a curriculum stage's
    distill_weight replaces it during that stage."""
    teacher_window: int | None = None
    """Frames of attention the teacher sees in every layer of the temporal transformer (TTT layers included);
    null: the model's full context (model.lm_kwargs.context, 3000 frames for Moshi). It must be at least the
    student's widest attention window."""
    temperature: float = 1.0
    """target=logits: softmax temperature of both teacher and student; the KL is multiplied by its square
    (Hinton et al.), so its gradient keeps the same scale."""
    target: str = "logits"
    """logits: KL(teacher || student) of the text and audio distributions at every valid position, weighted
    as Moshi's CE beside it (loss.text_padding_weight, first_codebook_weight, text_weight, audio_weight) |
    hidden: MSE between the outputs of the last transformer layer at every valid frame."""


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
    distill: DistillConfig = field(default_factory=DistillConfig)


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
    train_shards: Any = None
    """Training shards: a directory (its index.json, else *.tar), a glob, a brace pattern or a list; the one
    source named train when data.sources is empty (with sources, name it in one: shards: ${data.train_shards})."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Named training sources mixed by webdataset's RandomMix, NAME: {shards: ..., weight: ...} (shards: as
    train_shards; weight, default 1: the source's share of the sequences is weight / the sum of the weights);
    logged as data/NAME/samples. Empty: data.train_shards alone. A curriculum stage may draw other weights or a
    subset (curriculum.stages.N.sources). On the command line: data.sources.NAME.shards=DIR (+ for a new NAME)."""
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
    """Must equal ttt.ttt_layer.mini_batch_size when set; null: the variant's own setting."""
    attention_window: int | None = None
    """Frames of local attention during the stage, as ttt.attention_window (layers that carry a hybrid or
    cache_replacement TTT layer keep ttt.ttt_layer_attention_window); null: the model's setting."""
    window: int | None = None
    """Deprecated name of ``attention_window`` (still accepted, with a warning)."""
    distill_weight: float | None = None
    """Weight of the teacher's distillation loss during the stage (loss.distill); null: loss.distill.weight.
    0 turns the teacher off for the stage."""
    packing: bool = False
    """Pack consecutive conversations shorter than the stage into one sequence."""
    sources: dict[str, float] = field(default_factory=dict)
    """The stage's mixture, source name -> weight > 0 (names from data.sources; a subset is a different set);
    empty: every source of data.sources at its own weight. On the command line (Hydra merges dicts):
    curriculum.stages.N.sources.NAME=W changes a weight, ++ sets one a YAML file did not, ~ drops one."""
    reset_at_boundaries: bool = True
    """With packing: reset the TTT state where a packed conversation starts."""

    @property
    def frames(self) -> int:
        from moshi_ttt.constants import seconds_to_frames

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
class LoraConfig:
    """LoRA on the frozen base (moshi's own LoRALinear, B initialised at zero: step 0 is the base model)."""

    rank: int = 0
    """LoRA rank; 0: no LoRA (TTT is what trains)."""
    scaling: float = 2.0
    """LoRA scaling of the low-rank update."""
    modules: str = "transformer"
    """transformer (the temporal transformer, where long context lives) | all (the depformer too)."""


@dataclass
class ModelConfig:
    """The frozen base Moshi (``moshi_ttt.models.loading``): where its weights come from and how it runs.

    Also what ``moshi_ttt.models.loading`` reads (``MoshiSourceConfig`` is this class)."""

    source: str = "tiny"
    """hf (a Hugging Face repo, model.repo) | dir (a local copy, model.path) | tiny (random init from lm_kwargs)."""
    repo: str | None = None
    """source=hf: the repo id, e.g. kyutai/moshiko-pytorch-bf16."""
    path: str | None = None
    """source=dir: a directory with model.safetensors (and config.json unless it is Moshi 7B)."""
    revision: str | None = None
    """source=hf: a branch, tag or commit of the repo; null: the default branch."""
    dtype: str = "float32"
    """Dtype of the base weights: float32 | bfloat16 | float16 (TTT parameters stay float32)."""
    device: str = "cpu"
    """Device the base weights are loaded on (the trainer's strategy then moves the model)."""
    seed: int = 0
    """source=tiny: seed of the random initialisation."""
    gradient_checkpointing: bool = False
    """moshi's per-layer activation checkpointing, in the temporal transformer and the depformer."""
    train_base: bool = False
    """Train every base weight too (pretraining a tiny base from scratch, as the memory proof does); false: the
    base stays frozen and only LoRA / TTT parameters train."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    lm_kwargs: dict[str, Any] = field(default_factory=dict)
    """moshi's LMModel constructor arguments (free keys): source=tiny needs them all (conf/model/tiny.yaml); for
    hf / dir they override the checkpoint's config.json (e.g. context)."""


#: ``ttt.layer``, the deprecated name of ``ttt.ttt_layer``: every ``TTTConfig`` field, optional, null meaning
#: "not set" (the TTTConfig fields whose default is null lose nothing by that). Generated, so the two cannot
#: drift apart; ``moshi_ttt.config.groups`` moves what is set to ``ttt.ttt_layer``.
DeprecatedTTTLayer = dataclasses.make_dataclass(
    "DeprecatedTTTLayer", [(name, tp | None, field(default=None)) for name, tp in typing.get_type_hints(TTTConfig).items()])


@dataclass
class TTTVariantConfig:
    """The TTT variant, the Moshi layers it goes into and the attention around it (``moshi_ttt.models.insert``)."""

    variant: str = "none"
    """none | pre_attention | post_attention | hybrid | cache_replacement (conf/ttt/ has one file each, ttt=NAME;
    docs/design.md describes them)."""
    layer_indices: list[int] | None = None
    """Indices of the Moshi transformer layers that get a TTT layer (negative ones count from the end, e.g.
    [-3, -2, -1]); null: the last default_num_layers layers."""
    default_num_layers: int = 3
    """How many of the last layers get TTT when layer_indices is null."""
    ttt_layer: TTTConfig = field(default_factory=TTTConfig.schema_default)
    ttt_layer_attention_window: int = 256
    """hybrid and cache_replacement: frames of local attention kept in the layers that carry a TTT layer
    (hybrid: attention over the last W frames beside TTT; cache_replacement: keys/values older than the window
    are written into the TTT memory, attention window (ceil(W / b) + 1) * b, b = ttt_layer.mini_batch_size).
    The other variants ignore it."""
    memory_read: str = "add"
    """cache_replacement: how queries read the memory: add (a gated projection added to attention's output) |
    kv_slots (one slot f_W(q) per query inside the softmax)."""
    memory_key_adapter: bool = False
    """cache_replacement: the memory writes and reads with the attention's keys and queries through learned
    per-head maps from identity (k + k A_k, q + q A_q; attention keeps its own), so training can make the stored
    keys more distinct than attention needed them: a linear memory has no softmax to sharpen a match."""
    init_from_attention: bool = False
    """pre_attention, post_attention, hybrid: the TTT branch starts as a copy of its layer's attention (query, key,
    value and output projections; pre/post_attention's input norm from the attention's) with the gate at 0, so
    the memory reads at step 0 what that attention would match and copy, and step 0 is still the frozen model
    (as LoLCATs starts its linear attention from the softmax one). Needs ttt.ttt_layer.num_heads x head_dim =
    the attention's heads x head width. cache_replacement ignores it: its memory always holds the attention's
    own keys and values."""
    read_grad_through_attention: float = 0.1
    """pre_attention: the share of the memory read's gradient that flows back through its own layer's frozen
    attention (0..1). The read enters that attention's input in full (the forward, streaming included, is the same
    whatever the value); only training differs. At 1, the plain gradient, every position of the window pushes the
    read not to disturb lookups the attention already makes, and the memory does not learn to recall
    (docs/memory-proof.md). Other variants ignore it."""
    attention_window: int | None = None
    """Frames every layer's self-attention sees, at linear cost (chunked local attention); null: each layer
    keeps Moshi's context (3000 frames = 4 min). Layers that carry a hybrid or cache_replacement TTT layer use
    ttt_layer_attention_window instead; a curriculum stage's attention_window replaces it during the stage."""
    attention_chunk_size: int | None = None
    """Query block of the local attention; null: chosen from the window (64-256)."""
    attention_backend: str = "sdpa"
    """Kernel of the local attention: sdpa | math | flex (FlexAttention, CUDA)."""
    rope_max_period: float | None = None
    """RoPE max period of the temporal transformer; null: Moshi's (10000)."""
    rope_position_scale: float | None = None
    """RoPE position interpolation: positions are divided by this (null or 1: off)."""
    memory_slots: int | None = None
    """Removed (must stay null): kv_slots reads one slot f_W(q) per query, not fixed probe slots."""
    layers: list[int] | None = None
    """Deprecated name of ``layer_indices`` (still accepted, with a warning)."""
    layer: DeprecatedTTTLayer = field(default_factory=DeprecatedTTTLayer)  # type: ignore[valid-type]
    """Deprecated name of ``ttt_layer`` (still accepted, with a warning): ttt.layer.KEY sets ttt.ttt_layer.KEY."""
    window: int | None = None
    """Deprecated name of ``ttt_layer_attention_window`` (still accepted, with a warning)."""
    hybrid_alpha_init: float | None = None
    """Deprecated and ignored: hybrid keeps attention at full strength and adds the gated TTT read."""


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
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTVariantConfig = field(default_factory=TTTVariantConfig)


#: Documentation of named components inside the untyped dict groups, for ``explain``.
GROUP_DOCS = {
    "callbacks.model_checkpoint": "Lightning's ModelCheckpoint: step<N>.ckpt every every_n_train_steps steps "
                                  "(a positive number, or null: none) and last.ckpt.",
    "callbacks.resume_state": "Saves and restores what an exact resume needs besides the model (RNG, data position).",
    "callbacks.progress": "One plain log line every every_n_steps optimizer steps.",
    "callbacks.preemption": "On signal_name (SIGUSR1 from SLURM): checkpoint, then requeue the job when requeue.",
    "callbacks.ttt_health": "Logs TTT gates, fast-weight norms and learning rates every every_n_steps steps.",
    "callbacks.recall": "Scores recall on a held-out recall set at every validation: val/recall_in_window, "
                        "val/recall_beyond_window, recall by distance (W&B line plot, RUN_DIR/recall/).",
    "logger.csv": "Lightning's CSVLogger under <run_dir>/csv (one version_N per attempt).",
    "logger.wandb": "W&B, offline unless credentials exist; the run id is run_name, so a resume continues it.",
}

#: Keys inside ``trainer.strategy`` (untyped: DDP or DeepSpeed, conf/trainer/), for ``explain``:
#: key -> (type, meaning). ``zero`` stands for ``trainer.strategy.config.zero_optimization``.
_ZERO = "trainer.strategy.config.zero_optimization"
STRATEGY_DOCS: dict[str, tuple[str, str]] = {
    "trainer.strategy._target_": (
        "str", "The strategy class: lightning's DDPStrategy (trainer=ddp, ddp_sim) or "
               "moshi_ttt.training.deepspeed_strategy.MoshiDeepSpeedStrategy (trainer=deepspeed_*)."),
    "trainer.strategy.process_group_backend": ("str", "DDP: nccl (CUDA GPUs) | gloo (CPU processes)."),
    "trainer.strategy.find_unused_parameters": (
        "bool", "DDP: look for parameters without a gradient at every step (false: every trainable one gets one)."),
    "trainer.strategy.exclude_frozen_parameters": (
        "bool", "DeepSpeed: leave frozen (base) weights out of checkpoints; they are reloaded from model.source."),
    "trainer.strategy.config": ("dict", "DeepSpeed: the DeepSpeed config (ds_config) passed as is."),
    f"{_ZERO}.stage": ("int", "ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters."),
    f"{_ZERO}.overlap_comm": ("bool", "Overlap the gradient reduction with the backward pass (false on CPU)."),
    f"{_ZERO}.contiguous_gradients": (
        "bool", "Copy gradients into one contiguous buffer as they are produced (less fragmentation)."),
    f"{_ZERO}.reduce_scatter": (
        "bool", "ZeRO-2: average gradients with reduce-scatter (each rank gets its shard) instead of all-reduce."),
    f"{_ZERO}.reduce_bucket_size": (
        "int", "Elements reduced at once: larger is faster and holds more memory (the planner counts it)."),
    f"{_ZERO}.allgather_bucket_size": (
        "int", "ZeRO-2: elements all-gathered at once when the updated parameter shards are shared after a step."),
    f"{_ZERO}.stage3_prefetch_bucket_size": ("int", "ZeRO-3: parameter elements fetched ahead of their use."),
    f"{_ZERO}.stage3_param_persistence_threshold": (
        "int", "ZeRO-3: parameters with fewer elements stay whole on every GPU (no gather for small tensors)."),
    f"{_ZERO}.stage3_max_live_parameters": (
        "int", "ZeRO-3: most parameter elements gathered on a GPU at once before some are released."),
    f"{_ZERO}.stage3_max_reuse_distance": (
        "int", "ZeRO-3: a parameter needed again within this many elements is kept instead of released."),
    f"{_ZERO}.stage3_gather_16bit_weights_on_model_save": (
        "bool", "ZeRO-3: also save a consolidated 16-bit model at each checkpoint (false: export reads the shards)."),
    f"{_ZERO}.offload_optimizer.device": ("str", "Where the optimizer state lives: cpu (host RAM) | nvme | none."),
    f"{_ZERO}.offload_optimizer.pin_memory": ("bool", "Page-locked host memory for the offloaded optimizer state "
                                                      "(faster transfers, less RAM for everything else)."),
    f"{_ZERO}.offload_param.device": ("str", "ZeRO-3: where parameters live between uses: cpu | nvme | none."),
    f"{_ZERO}.offload_param.pin_memory": ("bool", "Page-locked host memory for the offloaded parameters."),
    "trainer.strategy.config.activation_checkpointing.partition_activations": (
        "bool", "DeepSpeed's own activation checkpointing (deepspeed.checkpointing), which moshi's layers do not "
                "use (they checkpoint with torch.utils.checkpoint: model.gradient_checkpointing): split saved "
                "activations across model-parallel ranks."),
    "trainer.strategy.config.activation_checkpointing.cpu_checkpointing": (
        "bool", "DeepSpeed's activation checkpointing: keep partitioned activations in host RAM."),
    "trainer.strategy.config.activation_checkpointing.contiguous_memory_optimization": (
        "bool", "DeepSpeed's activation checkpointing: copy activations into one contiguous buffer."),
    "trainer.strategy.config.zero_allow_untested_optimizer": (
        "bool", "Let ZeRO wrap the run's torch AdamW (DeepSpeed otherwise accepts only its own optimizers)."),
    "trainer.strategy.config.zero_force_ds_cpu_optimizer": (
        "bool", "With an offloaded optimizer, do not force DeepSpeed's CPUAdam (false: the run's AdamW steps)."),
    "trainer.strategy.config.communication_data_type": (
        "str | None", "Dtype of gradient communication (fp32, bf16, fp16); null: the training dtype."),
    "trainer.strategy.config.steps_per_print": (
        "int", "DeepSpeed's own progress line every N steps (huge: never; the run logs its own)."),
    "trainer.strategy.config.wall_clock_breakdown": (
        "bool", "DeepSpeed times forward, backward and step at every step (profiling)."),
}
