"""The planner: the 7B long-context plan, refusals with numbers, exact parameter counts, ZeRO order,
and the activation formulas against what autograd really saves on a small model."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml

from moshi_ttt import plan as P

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SEVEN_B = ["model=moshiko_7b", "curriculum=long_context"]


def _compose(*overrides: str):
    return P.compose_config(list(overrides), CONF)


def _totals(trainer: str, *extra: str, gpus: int = 8) -> list[P.StagePlan]:
    return P.plan(_compose(*SEVEN_B, f"trainer={trainer}", *extra), gpus, 80.0, 989e12, 0.35)


def test_7b_long_context_on_8x80_with_zero3_fits(capsys):
    plans = _totals("deepspeed_zero3")
    assert [p.name for p in plans] == ["15s", "5min", "30min"]
    assert [p.frames for p in plans] == [188, 3750, 22500]
    assert all(p.fits for p in plans), [(p.name, round(p.total, 1)) for p in plans]
    long = plans[-1]
    assert max(plans, key=lambda p: p.total) is long
    # the terms add up, the frozen 7B is sharded 8 ways, the loss phase (depformer + logits) dominates
    assert long.total == pytest.approx(sum(long.terms().values()), rel=1e-9)
    assert long.base_weights == pytest.approx(long.counts["frozen"] * 2 / 8 / 2**30)
    assert long.activation_phase == "loss" and long.depformer > long.logits > long.layer_inputs
    assert long.counts["frozen"] == 7_687_729_152  # Moshi 7B from its own constructor
    assert long.frames_per_s_gpu > 0 and long.stage_time_s > 0
    assert P.main([*SEVEN_B, "trainer=deepspeed_zero3", "--gpus", "8", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "30min" in out and "TOTAL GiB / GPU" in out


def test_impossible_plan_is_refused_with_the_numbers(tmp_path):
    """30-minute stage at batch 8 on one 24 GiB GPU with ZeRO-2: exit 1, stage and GiB named."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_TORCH_COMPILE": "1"}
    cmd = [sys.executable, "-m", "moshi_ttt.plan", *SEVEN_B, "trainer=deepspeed_zero2",
           "curriculum.stages.2.batch_size=8", "--gpus", "1", "--gpu-memory-gib", "24"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "DOES NOT FIT" in res.stderr and "Stage 2 '30min'" in res.stderr
    assert "GiB per GPU, 24 GiB available" in res.stderr
    assert "depformer activations" in res.stderr and "try:" in res.stderr
    assert "TOTAL GiB / GPU" in res.stdout  # the table still comes first


def test_config_that_cannot_train_exits_2(capsys):
    assert P.main(["ttt=none", "--gpus", "1"]) == 2  # tiny, LoRA off, no TTT: nothing to train
    assert "nothing to train" in capsys.readouterr().err
    with pytest.raises(P.PlanError, match="accumulate"):
        P.plan(_compose(*SEVEN_B, "trainer=deepspeed_zero3", "curriculum.stages.0.accumulate=2"), 8)


def test_memory_decreases_from_zero2_to_zero3_to_offload():
    z2, z3, off = (_totals(t) for t in ("deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"))
    for a, b, c in zip(z2, z3, off):
        assert a.total > b.total > c.total, (a.name, a.total, b.total, c.total)
        assert a.activations == b.activations == c.activations  # same micro-batch, same activations
    assert off[0].cpu_offload > 0 and z3[0].cpu_offload == 0


@pytest.mark.parametrize("variant,inner", [("pre_attention", "linear"), ("hybrid", "mlp"),
                                           ("post_attention", "linear"), ("cache_replacement", "linear"),
                                           ("cache_replacement:kv_slots", "linear")])
def test_tiny_parameter_counts_equal_the_built_model(variant, inner):
    from moshi_ttt.models import count_parameters, load_base_moshi
    from moshi_ttt.models.build import build_model, source_config

    variant, _, read = variant.partition(":")
    extra = [f"ttt.memory_read={read}"] if read else []
    rule = ["ttt.ttt_layer.rule=minibatch_gd"] if inner == "mlp" else []  # the delta rule's memory is linear
    cfg = _compose("model=tiny", f"ttt={variant}", f"ttt.ttt_layer.inner={inner}", "model.lora.rank=4", *extra, *rule)
    inputs = P.prepare(cfg)
    model_cfg = P._plain(cfg.model)
    base = count_parameters(load_base_moshi(source_config({**model_cfg, "lora": {"rank": 0}})))
    built = count_parameters(build_model(model_cfg, P._plain(cfg.ttt)))
    assert inputs.shape.frozen == base["total"] == built["frozen"]
    assert inputs.shape.lora + inputs.ttt.params == built["trainable"]
    assert inputs.shape.lora > 0 and inputs.ttt.params > 0
    plans = P.plan(cfg, 1)
    assert plans[0].counts["trainable"] == built["trainable"]
    assert plans[0].frames == cfg.data.seq_len and plans[0].batch_size == cfg.data.batch_size


def test_checkpointing_and_smaller_batches_lower_the_estimate():
    base = _totals("deepspeed_zero3")
    no_ckpt = _totals("deepspeed_zero3", "model.gradient_checkpointing=false")
    dep_ckpt = _totals("deepspeed_zero3", "+model.lm_kwargs.gradient_checkpointing=true")
    no_dep = _totals("deepspeed_zero3", "model.gradient_checkpointing=false", "+model.lm_kwargs.gradient_checkpointing=true")
    # build_model checkpoints the depformer with the transformer: the planner counts what it builds
    assert no_ckpt[-1].activations > base[-1].activations == dep_ckpt[-1].activations
    assert no_ckpt[-1].activations > no_dep[-1].activations
    small = _totals("deepspeed_zero3", "curriculum.stages.0.batch_size=1")
    assert small[0].activations < base[0].activations
    more = _totals("deepspeed_zero3", gpus=16)
    assert more[-1].base_weights == pytest.approx(base[-1].base_weights / 2)


@pytest.mark.parametrize("rule", ["minibatch_gd", "delta"])
def test_activation_formulas_match_what_autograd_saves(rule):
    """Per-token bytes saved for backward, counted with saved_tensors_hooks on a small bf16 model
    (the shapes of the calibration differ from the tiny config's)."""
    from moshi_ttt.models.build import build_model

    lm = dict(yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())["lm_kwargs"], dim=128, num_heads=8,
              num_layers=3, depformer_dim=64, depformer_num_heads=4, depformer_num_layers=2,
              depformer_dim_feedforward=128, card=96, text_card=80)
    model_cfg = {"source": "tiny", "lm_kwargs": lm, "dtype": "float32", "lora": {"rank": 0}}
    # TTT in layers 0 and 1 (layer 1 then sees an input that needs a gradient, like layers 30, 31 of
    # the 7B); layer 2 is a frozen layer on the gradient path
    ttt_cfg = {"variant": "pre_attention", "layer_indices": [0, 1], "ttt_layer": {"head_dim": 64, "rule": rule}}
    model = build_model(model_cfg, ttt_cfg).to(torch.bfloat16).train()
    where = {"name": None}
    for i, layer in enumerate(model.transformer.layers):
        layer.register_forward_pre_hook(lambda mod, inp, i=i: where.__setitem__("name", f"layer{i}"))
        layer.register_forward_hook(lambda mod, inp, out: where.__setitem__("name", None))
    model.depformer.register_forward_pre_hook(lambda mod, inp: where.__setitem__("name", "depformer"))
    model.depformer.register_forward_hook(lambda mod, inp, out: where.__setitem__("name", None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs: list[tuple[str, weakref.ref]] = []

    def pack(t):
        refs.append((where["name"] or "other", weakref.ref(t)))
        return t

    B, T = 2, 192  # whole mini-batches (16) and chunks (64): no padding
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randint(0, 60, (B, 17, T)))
    # what the graph still holds once the forward is done (storages shared by views counted once)
    saved: dict[str, dict[int, int]] = {}
    for name, ref in refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            saved.setdefault(name, {})[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    per_frame = {k: sum(v.values()) / (B * T) for k, v in saved.items()}
    shape = P._model_shape.__wrapped__(  # the planner's own view of this model
        __import__("json").dumps(lm, sort_keys=True), 0, "transformer", 100_000)
    D, H, hd = shape.dim, shape.hidden, shape.head_dim
    frozen = P.temporal_layer_saved(D, H, hd, 2)
    # on CPU the chunked attention also keeps its output and log-sum-exp (fused CPU kernel): <= 10%
    assert per_frame["layer2"] == pytest.approx(frozen, rel=0.10)
    dep = shape.dep_layers * shape.dep_q * P.depformer_layer_saved(
        shape.dep_dim, shape.dep_hidden, shape.dep_q, shape.dep_heads, 2)
    assert per_frame["depformer"] == pytest.approx(dep, rel=0.02)
    ttt = P.ttt_shape(ttt_cfg, shape)
    fast_weights = ttt.heads * ttt.fast_weight * 4 * B / (B * T)  # one scan group at T = 192
    assert ttt.rule == rule
    assert per_frame["layer1"] - per_frame["layer2"] == pytest.approx(
        P.ttt_saved(D, ttt.inner_width, 2, ttt.rule, ttt.heads) + fast_weights, rel=0.05), (D, ttt.inner_width, ttt.heads)


def test_distill_counts_the_teachers_forward_in_the_stages_that_use_it(capsys):
    """loss.distill in the 5-minute stage only: one more no-grad forward of the frozen 7B (teacher window 3000)
    that keeps nothing but its logits; the other stages are planned as before."""
    base = _totals("deepspeed_zero2")
    taught = _totals("deepspeed_zero2", "curriculum.stages.1.distill_weight=1.0")
    for b, t in zip(base, taught):
        assert t.total == pytest.approx(sum(t.terms().values()), rel=1e-9)
        if t.index != 1:
            assert (t.total, t.step_time_s, t.teacher, t.distill_weight) == (b.total, b.step_time_s, 0.0, 0.0)
    b, t = base[1], taught[1]
    shape = P.prepare(_compose(*SEVEN_B, "trainer=deepspeed_zero2")).shape
    frames = t.frames * t.batch_size
    logits = frames * 2 * (shape.text_out + shape.dep_q * shape.card)  # bf16 [B, T, text_card + 8 x 2048]
    assert t.teacher_forward * 2**30 >= logits and t.teacher * 2**30 >= logits
    assert t.layer_inputs == b.layer_inputs and t.ttt == b.ttt  # the teacher keeps no activations
    assert t.activations >= b.activations
    # time: 2 N per frame plus attention over 3000 frames, added to a compute-bound step
    assert 2 * t.counts["frozen"] < t.teacher_flops_per_frame < 2.2 * t.counts["frozen"]
    assert t.bound == "compute" and t.step_time_s == pytest.approx(b.step_time_s + t.teacher_time_s, rel=1e-9)
    hidden = _totals("deepspeed_zero2", "curriculum.stages.1.distill_weight=1.0", "loss.distill.target=hidden")
    assert 0 < hidden[1].teacher < t.teacher  # [B, T, D] instead of the logits
    assert P.main([*SEVEN_B, "trainer=deepspeed_zero2", "loss.distill.weight=0.5", "--gpus", "8", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "distill: teacher = the frozen base over 3000 frames" in out and "stage(s) 0, 1, 2" in out
    assert "teacher forward peak" in out and "GFLOP/frame" in out
