"""Loading frozen Moshi from each source, and LoRA as the adapter of the foundation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from moshi.modules.lora import LoRALinear

from moshi_ttt.models import (
    MoshiSourceConfig,
    apply_lora,
    count_parameters,
    load_base_moshi,
    save_base_checkpoint,
)


def _codes(kw, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, kw["card"], (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, kw["text_card"], (B, T), generator=g)
    return codes


def test_tiny_source_is_frozen_and_deterministic(tiny_lm_kwargs):
    a = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=3))
    b = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=3))
    assert count_parameters(a)["trainable"] == 0
    assert not a.training
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    # same weights, loaded from a file: equal state, logits equal to float rounding


def test_local_directory_round_trip(tiny_lm_kwargs, tmp_path):
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=1))
    save_base_checkpoint(base, tiny_lm_kwargs, tmp_path / "ckpt")
    loaded = load_base_moshi(MoshiSourceConfig(source="dir", path=str(tmp_path / "ckpt")))
    codes = _codes(tiny_lm_kwargs)
    with torch.no_grad():
        la, lb = base(codes), loaded(codes)
    torch.testing.assert_close(la.logits.nan_to_num(), lb.logits.nan_to_num(), atol=1e-5, rtol=0)
    assert count_parameters(loaded)["trainable"] == 0


def test_hf_repo_id_from_offline_cache(tiny_lm_kwargs, tmp_path, monkeypatch):
    """The repo-id path through moshi's CheckpointInfo, served from a hub cache laid out on disk."""
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=2))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--kyutai-test--tiny-moshi"
    snap = repo_dir / "snapshots" / commit
    save_base_checkpoint(base, tiny_lm_kwargs, snap)
    for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model"):
        (snap / name).write_bytes(b"unused by the LM loader")
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = load_base_moshi(MoshiSourceConfig(source="hf", repo="kyutai-test/tiny-moshi"))
    codes = _codes(tiny_lm_kwargs, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(base(codes).logits.nan_to_num(), loaded(codes).logits.nan_to_num(), atol=1e-5, rtol=0)


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_base_moshi(MoshiSourceConfig(source="dir", path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_base_moshi(MoshiSourceConfig(source="dir", path=str(tmp_path / "empty")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        old = hc.HF_HUB_OFFLINE
        hc.HF_HUB_OFFLINE = True
        with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
            load_base_moshi(MoshiSourceConfig(source="hf", repo="no-such-org/no-such-model"))
    finally:
        hc.HF_HUB_OFFLINE = old
        del os.environ["HF_HUB_OFFLINE"]
    with pytest.raises(ValueError, match="model.source"):
        load_base_moshi(MoshiSourceConfig(source="s3"))


def test_lora_starts_at_base_and_only_adapters_train(tiny_lm_kwargs):
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=5))
    codes = _codes(tiny_lm_kwargs, seed=6)
    with torch.no_grad():
        ref = base(codes).logits.nan_to_num()
    n = apply_lora(base, rank=4)
    assert n == sum(isinstance(m, LoRALinear) for m in base.modules()) > 0
    trainable = [name for name, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in t or ".lora_B." in t for t in trainable)
    with torch.no_grad():
        assert torch.equal(base(codes).logits.nan_to_num(), ref)
    assert apply_lora(base, rank=0) == 0  # rank 0: LoRA off, nothing more wrapped
    assert sum(isinstance(m, LoRALinear) for m in base.modules()) == n


def test_tiny_checkpoint_layout(tiny_lm_kwargs, tmp_path):
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs))
    out = save_base_checkpoint(base, tiny_lm_kwargs, tmp_path / "x")
    assert sorted(p.name for p in Path(out).iterdir()) == ["config.json", "model.safetensors"]
