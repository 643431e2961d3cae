"""Export: checkpoint -> a directory in moshi's layout (config.json + TTT/LoRA safetensors + codec)
-> the full model again, runnable in LMGen; the config comes from the checkpoint itself."""

from __future__ import annotations

import json
import logging

import torch
import yaml
from moshi.models.lm import LMGen
from omegaconf import OmegaConf
from safetensors.torch import load_file

from moshi_ttt.export import main as export_main
from moshi_ttt.models import build_model, load_exported
from moshi_ttt.training import train
from serve_model import make_trained_run


def test_export_round_trip_and_lmgen(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=smoke", "run_name=exp", "trainer.max_steps=4", "data.val_shards=null",
                      "ttt=cache_replacement", "ttt.ttt_layer_attention_window=16")
    summary = train(cfg)
    ckpt = f"{summary['checkpoint_dir']}/last.ckpt"
    out = tmp_path / "export"
    assert export_main([ckpt, str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["moshi_ttt"]["ttt"]["variant"] == "cache_replacement"
    assert meta["moshi_ttt"]["num_parameters"] == summary["param_counts"]["trainable"]
    assert meta["lora"] is False and not (out / "lora.safetensors").exists()
    assert meta["dim"] == cfg.model.lm_kwargs.dim and meta["model_type"] == "moshi"  # moshi's config layout

    model = load_exported(out)
    reference = build_model(OmegaConf.to_container(cfg.model, resolve=True), OmegaConf.to_container(cfg.ttt))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    codes = torch.randint(0, 64, (1, 17, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(codes).logits.nan_to_num(), reference(codes).logits.nan_to_num())
    gen = LMGen(model, use_sampling=False)
    with torch.no_grad(), gen.streaming(1):
        frames = [gen.step(codes[:, 9:, t : t + 1]) for t in range(6)]
    assert sum(f is not None for f in frames) >= 4


def test_export_with_lora_in_moshi_names_and_codec(compose_cfg, tmp_path):
    """LoRA weights carry moshi's own module names (what its loader reads); Mimi and tokenizer travel along."""
    from moshi.models import loaders

    from moshi_ttt.serving.model import load

    run = make_trained_run(compose_cfg, tmp_path, "model.lora.rank=2")
    out = tmp_path / "export"
    assert export_main([str(run), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["lora"] is True and meta["lora_rank"] == 2 and meta["lora_name"] == "lora.safetensors"
    assert {meta["mimi_name"], meta["tokenizer_name"]} == {"mimi.safetensors", "tokenizer.model"}
    lora = load_file(str(out / "lora.safetensors"))
    ttt = load_file(str(out / "ttt.safetensors"))
    assert lora and ttt and not set(lora) & set(ttt)
    lm_kwargs = {k: v for k, v in meta.items() if k not in ("moshi_ttt", "model_type", "mimi_name",
                 "mimi_config_name", "tokenizer_name", "lora_name")}
    plain = loaders.get_moshi_lm(None, lm_kwargs={**lm_kwargs}, device="cpu")  # moshi builds LoRA from lora/lora_rank
    assert set(lora) <= set(plain.state_dict()), sorted(set(lora) - set(plain.state_dict()))[:3]

    from_run, from_export = load(str(run)), load(str(out))
    codes = torch.randint(0, 64, (1, 17, 24))
    codes[:, 0] = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(from_export.lm(codes).logits.nan_to_num(), from_run.lm(codes).logits.nan_to_num())
    assert from_export.tokenizer.get_piece_size() == from_run.tokenizer.get_piece_size()


def test_checkpoint_config_wins_over_a_rewritten_config_yaml(compose_cfg, tmp_path, caplog):
    run = make_trained_run(compose_cfg, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["ttt"]["rope_position_scale"] = 4.0  # a later attempt changed a key that adds no parameter
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert export_main([str(run), str(tmp_path / "e1")]) == 0
    assert json.loads((tmp_path / "e1" / "config.json").read_text())["moshi_ttt"]["ttt"]["rope_position_scale"] is None

    ckpt = run / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=False)
    del raw["moshi_ttt_config"]  # a checkpoint from before checkpoints carried their config
    torch.save(raw, ckpt)
    with caplog.at_level(logging.WARNING):
        assert export_main([str(ckpt), str(tmp_path / "e2")]) == 0
    assert "no 'moshi_ttt_config' in the checkpoint" in caplog.text
    assert json.loads((tmp_path / "e2" / "config.json").read_text())["moshi_ttt"]["ttt"]["rope_position_scale"] == 4.0


def test_export_errors_name_the_path(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "o")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    assert export_main([str(tmp_path / "junk.ckpt"), str(tmp_path / "o")]) == 2
    assert "junk.ckpt" in capsys.readouterr().err
