"""loss.distill: the frozen base with a wide window teaches the student on the same module."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import open_trainables as _open
from helpers import random_codes as _codes
from helpers import read_metric, tiny_variant_model
from moshi_ttt.config.errors import ConfigError
from moshi_ttt.config.schema import DistillConfig, LossConfig
from moshi_ttt.models.attention import install_local_attention
from moshi_ttt.training.distill import (
    TeacherOutput,
    capture_hidden,
    distill_loss,
    teacher_forward,
    teacher_view,
)
from moshi_ttt.training.loss import moshi_loss
from moshi_ttt.training.module import MoshiTTTModule

# Tiny tensors: one thread is faster than two on the shared 2-core machine (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Step 0 of each of these is the frozen base with the variant's windows.
VARIANTS = ["pre_attention", "hybrid", "cache_replacement", "cache_replacement:kv_slots"]
PADS = (3, 0)  # the tiny model's text padding ids


def _model(kw, variant, window=8, attention_window=None, lora=0):
    """Tiny base (context 64) + optional LoRA + ``variant`` in layers 0 and -1 (mini-batch 4)."""
    return tiny_variant_model(kw, variant, window, attention_window=attention_window, lora=lora)


def _state(model):
    attn = [(type(m).__name__, getattr(m, "context", None)) for m in model.modules() if hasattr(m, "in_projs")]
    return attn, [m.ttt_enabled for m in model.modules() if hasattr(m, "ttt_enabled")], \
        [m.scaling for m in model.modules() if hasattr(m, "frozen_W")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_view_is_the_wide_frozen_base_and_restores_the_student_exactly(tiny_lm_kwargs, variant):
    base, model = _model(tiny_lm_kwargs, variant, window=8, attention_window=8, lora=4)
    _open(model)
    codes = _codes(tiny_lm_kwargs, B=1, T=40)
    before = _state(model)
    with torch.no_grad():
        student = model(codes)
        teacher = teacher_forward(model, codes, DistillConfig(weight=1.0))
        again = model(codes)
    assert _state(model) == before
    for a, b in ((student.logits, again.logits), (student.text_logits, again.text_logits)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # bit-identical
    # the teacher is the frozen base (no TTT, no LoRA) with its own context over the sequence
    install_local_attention(base)
    with torch.no_grad():
        ref = base(codes)
    torch.testing.assert_close(teacher.logits.nan_to_num(), ref.logits.nan_to_num(), atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher.text_logits.nan_to_num(), ref.text_logits.nan_to_num(), atol=1e-5, rtol=0)
    assert (teacher.logits - student.logits).nan_to_num().abs().max() > 1e-3
    # restored even when the block raises
    with pytest.raises(RuntimeError, match="boom"), teacher_view(model, 32):
        assert all(m.context == 32 for m in model.transformer.modules() if hasattr(m, "in_projs"))
        raise RuntimeError("boom")
    assert _state(model) == before


@pytest.mark.parametrize("variant", ["pre_attention", "hybrid", "cache_replacement:kv_slots"])
def test_kl_is_zero_at_step_0_with_the_students_window_and_positive_with_a_wider_one(tiny_lm_kwargs, variant):
    # every layer at one window W: cache_replacement's attention keeps its lag window, (ceil(8 / 1) + 1) * 1
    W = 9 if variant.startswith("cache_replacement") else 8
    _, model = _model(tiny_lm_kwargs, variant, window=8, attention_window=W)
    assert {int(m.context) for m in model.transformer.modules() if hasattr(m, "in_projs")} == {W}
    codes = _codes(tiny_lm_kwargs, B=1, T=40)  # longer than the window
    same = LossConfig(distill=DistillConfig(weight=1.0, teacher_window=W, temperature=2.0))
    wide = LossConfig(distill=DistillConfig(weight=1.0, teacher_window=None))  # the context, 64 >= 40 frames
    hidden = LossConfig(distill=DistillConfig(weight=1.0, target="hidden"))
    hidden_same = LossConfig(distill=DistillConfig(weight=1.0, target="hidden", teacher_window=W))
    with torch.no_grad():
        with capture_hidden(model) as box:
            out = model(codes)
        kl_same = distill_loss(out, teacher_forward(model, codes, same.distill), codes, same, PADS)
        kl_wide = distill_loss(out, teacher_forward(model, codes, wide.distill), codes, wide, PADS)
        teacher = teacher_forward(model, codes, hidden.distill)
        assert isinstance(teacher, TeacherOutput) and teacher.logits is None
        mse_wide = distill_loss(out, teacher, codes, hidden, PADS, 1, box["hidden"])
        mse_same = distill_loss(out, teacher_forward(model, codes, hidden_same.distill), codes, hidden_same, PADS, 1,
                                box["hidden"])
    assert box["hidden"].shape == (1, 40, tiny_lm_kwargs["dim"])
    assert abs(float(kl_same)) < 1e-6 and float(mse_same) < 1e-8, (float(kl_same), float(mse_same))
    assert float(kl_wide) > 1e-3 and float(mse_wide) > 1e-6, (float(kl_wide), float(mse_wide))
    if variant == "hybrid":  # the teacher's signal reaches the memory's parameters (zero read projection at step 0)
        kl = distill_loss(model(codes), teacher_forward(model, codes, wide.distill), codes, wide, PADS)
        kl.backward()
        out_proj = [p for n, p in model.named_parameters() if n.endswith("ttt.out_proj.weight")]
        assert out_proj and all(float(p.grad.abs().max()) > 0 for p in out_proj)


def test_a_text_only_loss_skips_the_teachers_depformer_and_is_the_same_loss(tiny_lm_kwargs, monkeypatch):
    """loss.audio_weight 0 reads no audio distribution of the teacher: its depformer does not run, the text
    logits and the distillation loss are bit for bit the full forward's, and the model is left as it was."""
    _, model = _model(tiny_lm_kwargs, "hybrid", window=8, attention_window=8)
    codes = _codes(tiny_lm_kwargs, B=2, T=40)
    text_only = LossConfig(audio_weight=0.0, distill=DistillConfig(weight=1.0))
    with torch.no_grad():
        out = model(codes)
        full = teacher_forward(model, codes, text_only.distill)
        calls, depformer = [], type(model).forward_depformer_training
        monkeypatch.setattr(type(model), "forward_depformer_training", lambda self, *a: calls.append(1) or depformer(self, *a))
        lean = teacher_forward(model, codes, text_only.distill, audio=False)
        assert not calls and lean.logits is None
        assert torch.equal(lean.text_logits.nan_to_num(), full.text_logits.nan_to_num())
        assert torch.equal(distill_loss(out, lean, codes, text_only, PADS), distill_loss(out, full, codes, text_only, PADS))
        assert "forward_depformer_training" not in vars(model)  # the class's method again
        model(codes)
        assert calls  # the student's forward still runs it
    with pytest.raises(ValueError, match="its audio ones when loss.audio_weight > 0"):
        distill_loss(out, lean, codes, LossConfig(distill=DistillConfig(weight=1.0)), PADS)


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def test_weight_0_is_the_plain_loss_and_a_weight_adds_the_teacher(tiny_lm_kwargs, monkeypatch, no_grad):
    _, model = _model(tiny_lm_kwargs, "hybrid", window=8, attention_window=8)
    codes = _codes(tiny_lm_kwargs, B=1, T=40)
    batch = {"codes": codes}
    plain = moshi_loss(model(codes), codes, LossConfig(), PADS).loss

    def module(**distill):
        m = MoshiTTTModule(lambda: model, loss=LossConfig(distill=DistillConfig(**distill)))
        m.configure_model()
        return m

    import moshi_ttt.training.module as M

    calls = []
    real = M.teacher_forward
    monkeypatch.setattr(M, "teacher_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    off, _, _ = module(weight=0.0)._shared_step(batch, "train")
    assert torch.equal(off.loss, plain) and not calls  # no teacher forward at all
    on, _, _ = module(weight=0.5)._shared_step(batch, "train")
    teacher = real(model, codes, DistillConfig(weight=0.5))
    d = distill_loss(model(codes), teacher, codes, LossConfig(), PADS)
    assert calls == [1] and float(d) > 1e-3
    torch.testing.assert_close(on.loss, plain + 0.5 * d)
    val, _, _ = module(weight=0.5)._shared_step(batch, "val")  # validation: Moshi's loss only
    assert torch.equal(val.loss, plain) and calls == [1]
    # a plain dict (a checkpoint's config) is read through the schema
    assert MoshiTTTModule(lambda: model, loss=LossConfig(distill={"weight": 2.0})).loss_cfg.distill.weight == 2.0


def test_smoke_run_logs_the_distill_loss_in_the_stage_that_asks_for_it(compose_cfg):
    from moshi_ttt.training import train

    stages = ("curriculum.stages=[{name:teach,seconds:3,steps:2,batch_size:2,distill_weight:1.0},"
              "{name:alone,seconds:3,steps:1,batch_size:2}]")
    cfg = compose_cfg("experiment=smoke", "run_name=distill", "data.synthetic.num_samples=8",
                      "data.synthetic.num_frames=40", "data.val_shards=null", "ttt.attention_window=8",
                      "loss.distill.weight=0.0", stages)
    summary = train(cfg)
    assert summary["global_step"] == 3
    distill = read_metric(summary["run_dir"], "train/distill_loss")
    loss, moshi = read_metric(summary["run_dir"], "train/loss"), read_metric(summary["run_dir"], "train/moshi_loss")
    assert sorted(distill) == [0, 1] and sorted(loss) == [0, 1, 2]  # stage 0 only
    assert all(v > 0 for v in distill.values())
    for step in (0, 1):  # train/loss is the total
        assert loss[step] == pytest.approx(moshi[step] + distill[step], rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ("loss.distill.weight=-1", "loss.distill.weight=-1"),
    ("loss.distill.temperature=0", "loss.distill.temperature=0"),
    ("loss.distill.teacher_window=0", "loss.distill.teacher_window=0"),
    ("loss.distill.target=attention", "loss.distill.target='attention'"),
    ("curriculum.stages=[{name:a,seconds:2,steps:1,distill_weight:-0.5}]", "curriculum.stages.0.distill_weight=-0.5"),
])
def test_bad_distill_settings_are_refused_naming_the_key(compose_cfg, override, message):
    from moshi_ttt.config.validate import validate_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose_cfg("experiment=smoke", override))


def test_a_teacher_narrower_than_the_student_is_refused(compose_cfg):
    from moshi_ttt.config.validate import validate_config

    # the student's non-TTT layers attend over the context (3000): a 64-frame teacher sees less
    with pytest.raises(ConfigError, match=r"loss\.distill\.teacher_window=64: .*the model's context: 3000"):
        validate_config(compose_cfg("experiment=smoke", "loss.distill.weight=1", "loss.distill.teacher_window=64"))
    # cache_replacement's window is its read lag window, (ceil(16 / 1) + 1) * 1 = 17 frames, in stage 0
    with pytest.raises(ConfigError, match=r"curriculum\.stages\.0 \(the attention window cache_replacement keeps .*: 17"):
        validate_config(compose_cfg(
            "experiment=smoke", "ttt=cache_replacement", "ttt.ttt_layer_attention_window=16",
            "ttt.attention_window=16", "loss.distill.teacher_window=16",
            "curriculum.stages=[{name:a,seconds:2,steps:1,distill_weight:1.0}]"))
    # the same teacher where no stage asks for one, or as wide as the student: accepted
    validate_config(compose_cfg("experiment=smoke", "loss.distill.teacher_window=64"))
    validate_config(compose_cfg("experiment=smoke", "ttt=hybrid", "ttt.ttt_layer_attention_window=16",
                                "ttt.attention_window=16", "loss.distill.weight=1", "loss.distill.teacher_window=16"))


def test_a_checkpoint_from_before_distill_resumes_without_a_config_change():
    from moshi_ttt.training.resume_config import config_changes

    new = {"loss": {"text_weight": 1.0, "distill": {"weight": 0.0, "teacher_window": None, "temperature": 1.0,
                                                    "target": "logits"}},
           "curriculum": {"stages": [{"name": "a", "seconds": 2, "steps": 1, "distill_weight": None}]}}
    old = {"loss": {"text_weight": 1.0}, "curriculum": {"stages": [{"name": "a", "seconds": 2, "steps": 1}]}}
    assert config_changes(old, new) == {}
    on = {**new, "loss": {**new["loss"], "distill": {**new["loss"]["distill"], "weight": 1.0}}}
    assert set(config_changes(old, on)) == {"loss.distill.weight"}
