"""Which Mimi and which text tokenizer belong to a trained model.

The tokens a model was trained on come from one codec and one tokenizer; serving it with
others gives noise. The sources, in order: an explicit choice (``--mimi``/``--tokenizer``);
the run config's ``codec`` section (``codec.mimi``, ``codec.tokenizer``); the dataset the run
trained on (``dataset.json`` above ``data.train_shards``, as the demo dataset writes it); the
base model's own checkpoint (``model.repo`` of a hub base, ``model.path`` of a local copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CodecSources:
    mimi: str
    tokenizer: str
    origin: str  # where they were found, for messages


def _dataset_json(shards) -> Path | None:
    if not shards or not isinstance(shards, str) or any(c in shards for c in "*?{"):
        return None
    path = Path(shards).expanduser()
    for parent in [path, *path.parents][:4]:
        if (parent / "dataset.json").exists():
            return parent / "dataset.json"
    return None


def codec_sources(run_cfg: dict, mimi: str | None = None, tokenizer: str | None = None) -> CodecSources:
    """Mimi and tokenizer sources for a run config (see the module docstring for the order)."""
    if mimi and tokenizer:
        return CodecSources(str(mimi), str(tokenizer), "the command line")
    found: list[tuple[str | None, str | None, str]] = []
    codec = run_cfg.get("codec") or {}
    if codec:
        found.append((codec.get("mimi"), codec.get("tokenizer"), "the run config's codec section"))
    data = run_cfg.get("data") or {}
    ds = _dataset_json(data.get("train_shards"))
    if ds is not None:
        meta = json.loads(ds.read_text())
        if meta.get("mimi") and meta.get("tokenizer"):
            found.append((str(ds.parent / meta["mimi"]), str(ds.parent / meta["tokenizer"]), str(ds)))
    model = run_cfg.get("model") or {}
    if model.get("source") == "hf" and model.get("repo"):
        found.append((model["repo"], model["repo"], f"model.repo={model['repo']}"))
    if model.get("source") == "dir" and model.get("path"):
        found.append((model["path"], model["path"], f"model.path={model['path']}"))
    for m, t, origin in found:
        if m and t:
            return CodecSources(str(mimi or m), str(tokenizer or t), origin)
    raise ValueError("cannot tell which Mimi and tokenizer this model was trained with (no codec section, no "
                     "dataset.json above data.train_shards, and the base is not a hub repo or local copy): pass "
                     "--mimi and --tokenizer")


def load_codec(sources: CodecSources, device: str = "cpu"):
    """(Mimi, sentencepiece tokenizer), each checked by the data package's loaders."""
    from moshi_ttt.data.alignment import load_text_tokenizer
    from moshi_ttt.data.codec import load_mimi

    return load_mimi(sources.mimi, device=device), load_text_tokenizer(sources.tokenizer)
