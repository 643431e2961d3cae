"""A 'trained' tiny model for the serving tests: a checkpoint that carries its run config, beside a
dataset directory with its Mimi and tokenizer (the demo dataset's layout), built in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moshi_ttt.data.codec import TINY_MIMI_CONFIG, build_tiny_mimi, save_mimi
from moshi_ttt.data.demo_dataset import train_tokenizer
from moshi_ttt.data.dialogue import corpus
from moshi_ttt.serving.checkpoint import CONFIG_KEY


def make_dataset_dir(root: Path) -> Path:
    """dataset.json + tokenizer.model + mimi/ (shards are not needed to serve)."""
    root.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus(0, 400), root / "tokenizer.model", 320)
    save_mimi(build_tiny_mimi(TINY_MIMI_CONFIG, seed=0), TINY_MIMI_CONFIG, root / "mimi")
    (root / "shards" / "train").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"tokenizer": "tokenizer.model", "mimi": "mimi"}))
    return root


def make_trained_run(compose_cfg, root: Path, *overrides: str, seed: int = 3, with_config: bool = True) -> Path:
    """A run directory whose ``checkpoints/last.ckpt`` holds perturbed (as if trained) adapter
    weights, so the TTT branch changes the outputs; ``with_config=False`` makes an old-style
    checkpoint that relies on the run's config.yaml."""
    dataset = make_dataset_dir(root / "dataset")
    cfg = compose_cfg("run_name=served", "model.lm_kwargs.text_card=320", "ttt=pre_attention",
                      f"data.train_shards={dataset}/shards/train", *overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    from moshi_ttt.models import build_model

    model = build_model(resolved["model"], resolved["ttt"])
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[f"model.{name}"] = p.detach() + 0.3 * torch.randn(p.shape, generator=gen)
    run_dir = root / "runs" / "served"
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = {"state_dict": state, "global_step": 1}
    if with_config:
        ckpt[CONFIG_KEY] = resolved
    torch.save(ckpt, run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir
