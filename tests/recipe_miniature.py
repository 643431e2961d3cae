"""The flagship recipe (conf/experiment/moshiko_ttt_30min.yaml) in miniature: only what cannot
run on a CPU is overridden, so every other key of the recipe runs here first.

Overridden: the model (tiny, with 3 layers; the recipe's ``ttt.layer_indices`` read relative to depth, as
the memory proof's ``recipe`` row reads them: [0, 16, 31] of 32 -> all 3; gradient checkpointing, the
teacher and every other TTT setting kept), the codec of the audio samples
(a tiny Mimi and tokenizer instead of the model repo's; shorter samples), the data (synthetic shards for
the corpus, token-level recall conversations for the recall sources and the recall callback's held-out
set: the recipe's mixtures and callback run as written), the trainer (DeepSpeed on 2 CPU processes), the
stages' lengths/steps/batches (same packing and reset policy), and the logger's mode (W&B offline, as the
test environment sets).
"""

from __future__ import annotations

STAGE_SHAPES = [  # (seconds, steps, batch_size): 32, 200 and 300 frames
    (2.56, 4, 2),
    (16, 4, 1),
    (24, 3, 1),
]


def stage_overrides(shapes=STAGE_SHAPES) -> list[str]:
    out = []
    for i, (seconds, steps, batch) in enumerate(shapes):
        out += [f"curriculum.stages.{i}.seconds={seconds}", f"curriculum.stages.{i}.steps={steps}",
                f"curriculum.stages.{i}.batch_size={batch}", f"curriculum.stages.{i}.warmup_steps=1"]
    return out


def total_steps(shapes=STAGE_SHAPES) -> int:
    return sum(steps for _, steps, _ in shapes)


def stage_of_step(step: int, shapes=STAGE_SHAPES) -> int:
    """The curriculum stage of optimizer step ``step`` (0-based)."""
    end = 0
    for i, (_, steps, _) in enumerate(shapes):
        end += steps
        if step < end:
            return i
    raise ValueError(step)


#: Recall sets of the miniature: (directory, conversations, delay in frames). The held-out one has a fact
#: inside the tiny Moshi's 3000-frame window and one beyond it.
RECALL_SETS = (("recall_5min", 16, 120), ("recall_30min", 16, 200), ("heldout_near", 1, 100),
               ("heldout_far", 1, 3100))


def write_recall_sets(root) -> None:
    """Token-level recall conversations standing in for the recipe's spoken ones (written once)."""
    from pathlib import Path

    from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards

    for name, count, delay in RECALL_SETS:
        if not (Path(root) / name / "index.json").exists():
            write_token_recall_shards(Path(root) / name, count, TokenRecallSpec(delay_frames=delay, fact_start_jitter=10,
                                                                               tail_frames=5), seed=delay,
                                      samples_per_shard=4)


NUM_LAYERS = 3


def recipe_layers(num_layers: int = NUM_LAYERS) -> str:
    """The recipe's TTT layers at the same relative depth of a ``num_layers``-deep tiny model."""
    from moshi_ttt.memory_proof import recipe_row

    return next(o for o in recipe_row("moshiko_ttt_30min", num_layers) if o.startswith("ttt.layer_indices="))


def miniature_overrides(codec_dir, trainer: str | None = "deepspeed_cpu_sim", shapes=STAGE_SHAPES) -> list[str]:
    """``python train.py`` arguments after ``experiment=moshiko_ttt_30min``. ``codec_dir`` holds a
    tiny Mimi and tokenizer (``serve_model.make_dataset_dir``) for the recipe's audio samples; the
    recall sets are written there too. ``trainer=None`` leaves the trainer to the caller (the sbatch
    script reads MOSHI_TTT_TRAINER)."""
    write_recall_sets(codec_dir)
    out = [
        "model=tiny",
        "model.gradient_checkpointing=true",
        f"model.lm_kwargs.num_layers={NUM_LAYERS}",
        recipe_layers(),
        "model.lm_kwargs.text_card=320",  # the tiny tokenizer's pieces
        f"callbacks.audio_samples.mimi={codec_dir}/mimi",
        f"callbacks.audio_samples.tokenizer={codec_dir}/tokenizer.model",
        "callbacks.audio_samples.every_n_steps=1",
        "callbacks.audio_samples.frames=40",
        "callbacks.audio_samples.prompt_frames=20",
        "data=synthetic",
        "data.val_shards=${data.train_shards}",
        f"data.sources.recall_5min.shards={codec_dir}/recall_5min",
        f"data.sources.recall_30min.shards={codec_dir}/recall_30min",
        f"callbacks.recall.shards=[{codec_dir}/heldout_near,{codec_dir}/heldout_far]",
        "data.val_batches=1",
        "data.num_workers=0",
        "trainer.val_check_interval=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.progress.every_n_steps=1",
        *stage_overrides(shapes),
    ]
    return ([f"trainer={trainer}"] if trainer else []) + out
