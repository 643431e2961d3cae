"""The typed config: Hydra rejects wrong types, validation rejects nonsense before compute, each error
is one line naming the key, renamed keys keep working with a warning, and every key is documented."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from moshi_ttt.config.errors import ConfigError, describe
from moshi_ttt.config.explain import all_keys, field_docs
from moshi_ttt.config.schema import DataConfig, TrainConfig, TrainerConfig
from moshi_ttt.config.stages import ConfigDeprecationWarning
from moshi_ttt.config.validate import validate_config
from moshi_ttt.training import train
from moshi_ttt.training.curriculum import Curriculum, apply_stage_to_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=abc"], "optim.lr=abc"),
    (["seed=abc"], "seed=abc"),
    (["curriculum=demo", "curriculum.stages.1.steps=abc"], "curriculum.stages.1.steps=abc"),
    (["data.num_workers=two"], "data.num_workers=two"),
    (["loss.text_weight=[1]"], "loss.text_weight"),
])
def test_hydra_rejects_wrong_types_naming_the_key(compose_cfg, overrides, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(*overrides)
    line = describe(info.value)
    assert line is not None and line.startswith(key) and "\n" not in line, line


def test_unknown_key_and_group_option_are_named(compose_cfg):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("optim.lrr=1")
    assert describe(info.value) == "optim.lrr: no such key (keys: python -m moshi_ttt.config explain optim)"
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("curriculum=nope")
    assert describe(info.value) == "curriculum=nope: no such config; available: demo, long_context, none"


@pytest.mark.parametrize("overrides, message", [
    (["curriculum=demo", "curriculum.stages.1.lr=-0.01"], "curriculum.stages.1.lr=-0.01: a positive learning rate"),
    (["loss.first_codebook_weight=-100"], "loss.first_codebook_weight=-100.0: a finite number >= 0"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5: an integer >= 0"),
    (["callbacks.model_checkpoint.every_n_train_steps=0"],
     "callbacks.model_checkpoint.every_n_train_steps=0: a positive integer, or null"),
    (["curriculum=demo", "trainer.max_steps=5"], "trainer.max_steps=5: under a curriculum the curriculum sets the "
                                                 "run length, 90 steps"),
    (["data.num_workers=-1"], "data.num_workers=-1: an integer >= 0"),
    (["data.min_frames=100000"], "data.min_frames=100000: longer than every conversation in data.train_shards "
                                 "(at most 160 frames, from data.synthetic.num_frames)"),
    (["ttt.ttt_layer.inner=foo"], "ttt.ttt_layer.inner='foo' must be one of ('linear', 'mlp')"),
    (["optim.lr=0"], "optim.lr=0.0: a finite number > 0"),
    (["optim.opening_lr_scale=0"], "optim.opening_lr_scale=0.0: a finite number > 0"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]: two numbers in [0, 1)"),
    (["+callbacks.progress.every_n_step=3"], "callbacks.progress.every_n_step: PlainProgressLogger takes no argument"),
    (["curriculum=demo", "curriculum.stages.0.warmup_steps=50"], "curriculum.stages.0.warmup_steps=50: an integer "
                                                                 "in [0, steps=40]"),
    (["run_name=.."], "run_name='..': must name a directory of its own"),
    (["ttt.read_grad_through_attention=2"], "ttt.read_grad_through_attention=2.0: a share of the gradient, in [0, 1]"),
    (["ttt.ttt_layer.rule=delta", "ttt.ttt_layer.mini_batch_size=4"],
     "ttt.ttt_layer.mini_batch_size=4 does not apply to ttt.ttt_layer.rule='delta'"),
    (["ttt=cache_replacement", "ttt.ttt_layer.rule=delta", "ttt.ttt_layer.kernel=fla"],
     "ttt.ttt_layer.kernel='fla': auto or torch here: "),
])
def test_nonsense_settings_are_refused_naming_the_key(compose_cfg, overrides, message):
    cfg = compose_cfg("experiment=smoke", *overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_min_frames_is_checked_against_the_shard_index(compose_cfg, tmp_path):
    from moshi_ttt.data.synthetic import write_synthetic_shards

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=4, num_frames=(20, 30), card=64, text_card=64, samples_per_shard=2)
    cfg = compose_cfg("experiment=smoke", "data=shards", f"data.train_shards={shards}", "data.min_frames=100000")
    with pytest.raises(ConfigError, match=r"data.min_frames=100000: longer than every conversation .*at most "
                                          r"\d+ frames, from the shards' index.json"):
        validate_config(cfg)
    validate_config(compose_cfg("experiment=smoke", "data=shards", f"data.train_shards={shards}", "data.min_frames=20"))


def test_refused_before_anything_is_written(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        train(compose_cfg("experiment=smoke", "run_name=refused", "optim.warmup_steps=-5"))
    assert not (tmp_path / "runs" / "refused").exists()


def test_deepspeed_on_gpus_without_cuda_points_to_the_cpu_simulation(compose_cfg, monkeypatch):
    import moshi_ttt.config.validate as V

    monkeypatch.setattr(V, "_cuda_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs CUDA GPUs .* trainer=deepspeed_cpu_sim runs the same"):
        validate_config(compose_cfg("experiment=smoke", "trainer=deepspeed_zero2"))
    with pytest.raises(ConfigError, match=r"needs CUDA GPUs .* trainer=cpu runs on CPU"):
        validate_config(compose_cfg("experiment=smoke", "trainer=gpu"))
    validate_config(compose_cfg("experiment=smoke", "trainer=deepspeed_cpu_sim"))


def test_the_curriculum_sets_the_run_length(compose_cfg):
    assert compose_cfg("experiment=smoke").trainer.max_steps == 30
    cfg = compose_cfg("experiment=smoke", "curriculum=demo")
    assert cfg.trainer.max_steps == cfg.optim.total_steps == 90
    validate_config(cfg)
    validate_config(compose_cfg("experiment=smoke", "curriculum=demo", "trainer.max_steps=90"))
    assert compose_cfg("curriculum=demo", "curriculum.stages.2.steps=7").trainer.max_steps == 77


def test_curriculum_window_is_renamed_attention_window(compose_cfg):
    """The old key still reaches the layers, with a warning that names the new one."""
    cfg = compose_cfg("experiment=smoke", "curriculum=demo", "curriculum.stages.1.window=64")
    with pytest.warns(ConfigDeprecationWarning, match=r"curriculum.stages.1.window is deprecated: use "
                                                      r"curriculum.stages.1.attention_window"):
        curriculum = Curriculum.from_config(OmegaConf.to_container(cfg.curriculum, resolve=True))
    assert [s.attention_window for s in curriculum.stages] == [None, 64, None]

    class Layer(__import__("torch").nn.Module):
        def configure_for_stage(self, ttt_mini_batch_size, window):
            self.window = window

    layer = Layer()
    apply_stage_to_model(layer, curriculum.stages[1])
    assert layer.window == 64

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name: no warning
        new = compose_cfg("experiment=smoke", "curriculum=demo", "curriculum.stages.1.attention_window=64")
        assert Curriculum.from_config(OmegaConf.to_container(new.curriculum)).stages[1].attention_window == 64
    both = compose_cfg("experiment=smoke", "curriculum=demo", "curriculum.stages.1.window=32",
                       "curriculum.stages.1.attention_window=64")
    with pytest.raises(ConfigError, match=r"curriculum.stages.1.window=32: deprecated name of "
                                          r"curriculum.stages.1.attention_window, which is set to 64"):
        validate_config(both)


def test_every_option_of_every_group_composes_against_the_schema(compose_cfg):
    """A key in a YAML file that the schema lacks (or of the wrong type) fails here, not in a run."""
    conf = REPO / "conf"
    for group in sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name not in ("hydra",)):
        for option in sorted(p.stem for p in (conf / group).glob("*.yaml") if not p.stem.startswith("_")):
            cfg = compose_cfg(f"{group}={option}", "data.train_shards=/shards")
            assert OmegaConf.to_container(cfg, resolve=False), (group, option)


def test_schema_matches_the_components_it_configures():
    """Data and trainer keys are the arguments of what Hydra instantiates from them."""
    from lightning import Trainer

    from moshi_ttt.training.datamodule import TokenDataModule

    data_keys = {f.name for f in dataclasses.fields(DataConfig)} - {"_target_", "_convert_"}
    assert data_keys == set(inspect.signature(TokenDataModule).parameters)
    trainer_args = set(inspect.signature(Trainer).parameters)
    assert {f.name for f in dataclasses.fields(TrainerConfig)} - {"_target_"} <= trainer_args


def test_every_key_is_documented():
    undocumented = [k.key for k in all_keys() if not k.doc.strip()]
    assert not undocumented, undocumented
    assert field_docs(TrainConfig)["run_name"].startswith("Names the run directory")


def _run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"NO_TORCH_COMPILE": "1", "WANDB_MODE": "offline", **(env_extra or {})})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_explain_command_prints_meaning_type_default_and_value(tmp_path):
    proc = _run("-m", "moshi_ttt.config", "explain", "optim.lr", "experiment=demo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "optim.lr  [float]  default: 0.001  now: 0.003"
    assert "Peak learning rate" in proc.stdout
    proc = _run("-m", "moshi_ttt.config", "explain", "curriculum.stages.1.window", "curriculum=long_context")
    assert proc.returncode == 0 and "Deprecated name of ``attention_window``" in proc.stdout, proc.stdout
    proc = _run("-m", "moshi_ttt.config", "explain", "optim.lrr")
    assert proc.returncode == 2 and "optim.lrr: no such documented key" in proc.stderr


def test_train_cli_bad_setting_is_one_line_with_status_2(tmp_path):
    out = {"MOSHI_TTT_OUTPUT": str(tmp_path)}
    proc = _run("train.py", "optim.lr=abc", env_extra=out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: optim.lr=abc: optim.lr takes a number"
    proc = _run("train.py", "optim.lr=abc", env_extra={**out, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "optim.lr" in proc.stderr


def test_train_cli_deepspeed_without_cuda(tmp_path):
    """A setting refused by validation inside the run (not by Hydra): also one line, status 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: trainer=deepspeed_zero2 is valid here")
    proc = _run("train.py", "trainer=deepspeed_zero2", env_extra={"MOSHI_TTT_OUTPUT": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: trainer=deepspeed_zero2 (trainer.accelerator=gpu) needs CUDA GPUs and this "
                                   "machine has none; trainer=deepspeed_cpu_sim runs the same DeepSpeed ZeRO code on "
                                   "CPU processes")


def test_train_help_documents_groups_and_keys():
    proc = _run("train.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("== Configuration groups ==", "curriculum: demo, long_context, none", "== What each key means ==",
                 "optim.lr  [float]  default: 0.001", "curriculum.stages.N.attention_window",
                 "trainer.max_steps  [int]  default: ${moshi_ttt.run_steps:100}", "callbacks.model_checkpoint"):
        assert text in proc.stdout, text
