"""The planner's named formulas on small shapes whose answers can be worked out by hand."""

from __future__ import annotations

import pytest

from moshi_ttt.plan.comm import Traffic, link_bytes_per_step, step_time
from moshi_ttt.plan.config import Hardware, Strategy
from moshi_ttt.plan.estimate import layer_window, model_window, teacher_window
from moshi_ttt.plan.flops import (
    attention_flops,
    backward_flops,
    compute_seconds,
    delta_rule_flops,
    effective_window,
    forward_flops,
    minibatch_gd_flops,
    recompute_flops,
)
from moshi_ttt.plan.memory import (
    activation_bytes,
    activation_peak,
    attention_block_bytes,
    first_backward_layer,
    gradient_transient_bytes,
    logits_loss_bytes,
    scan_checkpoints,
    zero_memory,
)
from moshi_ttt.plan.shapes import ModelShape, TTTShape


def _shape(**changes) -> ModelShape:
    fields = dict(dim=8, num_layers=2, num_heads=2, hidden=16, context=3000, text_out=3, card=4, dep_q=2, dep_dim=4,
                  dep_layers=1, dep_heads=1, dep_hidden=8, dep_checkpointing=False, frozen=1000, lora=0,
                  lora_depformer=False, lora_rank=0, small_params=10, layer_params=(300, 400), layer_mm=(10, 20),
                  lora_mm=0, head_mm_flops=5, dep_attention_flops=3)
    return ModelShape(**{**fields, **changes})


def _ttt(**changes) -> TTTShape:
    fields = dict(variant="pre_attention", layers=(1,), heads=2, head_dim=4, inner="linear", hidden=0, mini_batch=4,
                  group=0, params_per_layer=100, mm_per_layer=4, extra_frozen_mm=1, windows={}, rule="delta", chunk=8)
    return TTTShape(**{**fields, **changes})


def _strategy(stage: int, half: bool = True, **changes) -> Strategy:
    return Strategy(f"ZeRO-{stage}", True, stage, False, False, half, **changes)


def test_attention_visits_keys_block_by_block():
    assert attention_flops(10, 8) == 320  # scores and values: 2 multiply-adds per key and channel
    assert effective_window(4, None, 4) == (4.0, 4)  # one block of 4 queries x 4 keys
    # window 2, chunks of 2: block [0, 2) reads keys [0, 2) (2 x 2), block [2, 4) reads [1, 4) (2 x 3)
    assert effective_window(4, 2, 2) == (2.5, 2)
    assert attention_block_bytes(batch=1, heads=2, chunk=4, window=3, frames=2) == 3 * 2 * 2 * (3 + 2 - 1) * 4


def test_memory_flops_per_token():
    assert delta_rule_flops(head_dim=1, chunk=1) == 4 * 2 + 1 * 3 + 6 * 2 + 2 * 1  # K = 2, V = 1, C = 1
    assert minibatch_gd_flops("linear", head_dim=2, hidden=0, mini_batch=3) == 6 * 4 + 4 * 3 * 2
    assert minibatch_gd_flops("mlp", head_dim=2, hidden=4, mini_batch=1) == 14 * 8 + 4 * 4 + 4 * 2
    assert _ttt(rule="delta", head_dim=1, chunk=1).inner_flops(4) == 2 * 25  # two heads


def test_step_flops_count_forward_backward_and_recompute():
    shape, ttt, attention, inner = _shape(), _ttt(), [1.0, 2.0], 7
    # 2 x (temporal 30 + TTT layer 5) + heads 5 + attention 3 + depformer attention 3 + memory 7
    assert forward_flops(shape, ttt, attention, inner) == 88
    # from layer 1: 2 x (20 + 5) + heads 5 + dL/dW 2 x 4 + attention 2 x 2 + depformer 2 x 3 + memory 2 x 7
    assert backward_flops(shape, ttt, attention, inner, [1]) == 87
    assert recompute_flops(shape, ttt, attention, inner, [1], checkpointing=False) == 2.0  # attention blocks
    assert recompute_flops(shape, _ttt(group=4), attention, inner, [1], checkpointing=False) == 2.0 + 7
    # checkpointing reruns layer 1's forward: 2 x 20 + 2.0, and its TTT layer 2 x 5 + 7
    assert recompute_flops(shape, ttt, attention, inner, [1], checkpointing=True) == 2.0 + 42 + 17
    assert compute_seconds(10, 1e12, Hardware(mfu=0.5, gpu_flops=1e13)) == pytest.approx(2.0)


def test_activation_bytes_and_what_trains():
    fp32, bf16 = Strategy("ddp", False, 0, False, False, True), _strategy(2)
    assert activation_bytes(4, fp32) == 4  # autocast alone: the fp32 module saves fp32 inputs
    assert activation_bytes(2, fp32) == 2 and activation_bytes(4, bf16) == 2  # DeepSpeed casts the module
    assert activation_bytes(4, _strategy(2, half=False)) == 4
    assert first_backward_layer(_shape(num_layers=4), _ttt(layers=(2, 3))) == 2
    assert first_backward_layer(_shape(num_layers=4, lora_rank=8), _ttt(layers=(2, 3))) == 0
    assert first_backward_layer(_shape(num_layers=4), None) == 4


def test_small_memory_terms():
    assert gradient_transient_bytes(D=2, H=3, a=2) == 2 * (6 + 6) + 8 * 2
    assert scan_checkpoints(10, 4) == 3 and scan_checkpoints(10, 0) == 10
    # text 3 + audio 2 x 4: fp32 log-softmax of both, then one head's backward (8 + 2a) x the larger
    assert logits_loss_bytes(_shape(), a=2, tokens=1) == 4 * 11 + 12 * 8
    assert activation_peak(1.0, 0.0, 5.0, 0.0, 3.0, 0.0) == (6.0, "loss")
    assert activation_peak(1.0, 2.0, 5.0, 0.0, 7.0, 0.0) == (10.0, "backward")
    assert activation_peak(1.0, 0.0, 5.0, 1.0, 3.0, 9.0) == (9.0, "teacher")


def test_zero_partitions_in_the_zero_papers_order():
    shape, ttt = _shape(), _ttt(layers=(0, 1), params_per_layer=50)  # Psi = 100, bf16: p = 2, K = 12
    z2 = zero_memory(shape, ttt, _strategy(2), world=4)
    assert (z2.base, z2.params, z2.grads, z2.optimizer, z2.gathered) == (2000, 200, 50, 300, 0.0)
    assert z2.comm == 2 * 100 * 2  # reduce + all-gather buckets, each at most Psi
    z3 = zero_memory(shape, ttt, _strategy(3, prefetch_bucket=5), world=4)
    assert (z3.base, z3.params, z3.comm) == (500, 50, 200)
    assert z3.gathered == (450 + 5 + 10) * 2  # largest layer (400 + its TTT 50) + prefetch, + small tensors
    off = zero_memory(shape, ttt, Strategy("off", True, 3, True, True, True), world=4)
    assert (off.base, off.params, off.optimizer) == (0.0, 0.0, 0.0)
    assert off.cpu == 300 + 100 * 4 / 4 + 500 + 50


def test_link_time_and_the_step_bound():
    assert link_bytes_per_step(Traffic(gather=10, gradients=6), accumulate=2, world=4) == (20 + 6) * 3 / 4
    assert link_bytes_per_step(Traffic(gradients=6), accumulate=1, world=1) == 0
    hw = Hardware(link_gbs=1.0, pcie_gbs=1.0)
    assert step_time(0.5, 2e9, 1e9, hw) == (2.0, "link")
    assert step_time(3.0, 2e9, 1e9, hw) == (3.0, "compute")


def test_windows_follow_the_stage_then_ttt_then_the_context():
    assert model_window({"variant": "hybrid", "attention_window": 100}, 4, 3000) == 100
    assert model_window({"variant": "hybrid", "attention_window": 100}, 4, 3000, stage_window=50) == 50
    assert model_window({"variant": "none"}, 4, 3000) == 3000
    assert model_window({"variant": "none"}, 4, None) is None
    hybrid = _ttt(windows={3: 256})
    assert [layer_window(hybrid, i, 1000, 500) for i in (0, 3)] == [500, 256]  # capped by the sequence
    assert layer_window(None, 0, None, 500) == 500
    assert teacher_window(None, 3000, 100) == 100 and teacher_window({"teacher_window": 50}, 3000, 100) == 50
    assert teacher_window({}, None, 100) == 100
