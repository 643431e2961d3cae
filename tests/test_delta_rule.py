"""The delta-rule memory (``ttt.ttt_layer.rule=delta``) against the frame-by-frame reference, float64.

``moshi_ttt.ttt.reference.reference_delta_head`` writes S <- a S + beta k (v - a S^T k) one frame at
a time with nothing clever; the chunkwise engine (``moshi_ttt.ttt.delta``) must equal it to 1e-8
in reads, final state and every gradient, whatever the chunk size, lag, decay, cut or reset.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F

from moshi_ttt.ttt import TTTConfig, TTTLayer, TTTMemory, fla_kernels
from moshi_ttt.ttt.delta import chunk_delta_rule, delta_rule_read
from moshi_ttt.ttt.reference import reference_delta_head, reference_layer, reference_memory

TOL = {"rtol": 1e-8, "atol": 1e-8}
F64 = torch.float64


def _streams(B=2, H=2, T=37, K=5, V=4, decay=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g, dtype=F64)
    k = F.normalize(torch.randn(B, H, T, K, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, H, T, V, generator=g, dtype=F64)
    beta = torch.rand(B, H, T, generator=g, dtype=F64)
    S0 = torch.randn(B, H, K, V, generator=g, dtype=F64)
    log_decay = -0.3 * torch.rand(B, H, T, generator=g, dtype=F64) if decay else None
    return q, k, v, beta, S0, log_decay


def _reference(q, k, v, beta, S0, log_decay, lag, num_commit):
    """Per sample and head: reads of every query (the writes past num_commit are never read) and the
    state after num_commit frames."""
    B, H, T, V = v.shape
    reads, states = [], []
    for s in range(B):
        for h in range(H):
            g = None if log_decay is None else log_decay[s, h]
            reads.append(reference_delta_head(q[s, h], k[s, h], v[s, h], beta[s, h], S0[s, h], g, lag)[0])
            w = slice(0, num_commit)
            states.append(reference_delta_head(q[s, h, w], k[s, h, w], v[s, h, w], beta[s, h, w], S0[s, h],
                                               None if g is None else g[w], lag)[1])
    return torch.stack(reads).view(B, H, T, V), torch.stack(states).view(*S0.shape)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("lag", [0, 1, 3])
@pytest.mark.parametrize("chunk,group", [(1, 5), (16, 2), (64, 0)])
def test_chunkwise_engine_equals_the_frame_by_frame_rule(chunk, group, lag, decay):
    """37 frames (no multiple of any chunk), reads, final state and the gradient of every input."""
    q, k, v, beta, S0, log_decay = _streams(decay=decay, seed=chunk + lag)
    inputs = [t.requires_grad_() for t in (q, k, v, beta, S0, log_decay) if t is not None]
    T = k.shape[2]
    num_commit = T if lag == 0 else T - lag + 1
    out, S = delta_rule_read(q, k, v, beta, S0, log_decay, read_lag=lag, num_commit=num_commit, chunk_size=chunk,
                             checkpoint_group_size=group)
    ref_out, ref_S = _reference(q, k, v, beta, S0, log_decay, lag, num_commit)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(S, ref_S, **TOL)
    assert out.abs().max() > 1e-2
    g = torch.Generator().manual_seed(7)
    w_out, w_S = torch.randn(out.shape, generator=g, dtype=F64), torch.randn(S.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((out * w_out).sum() + (S * w_S).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * w_out).sum() + (ref_S * w_S).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **TOL)


def _memory(lag=0, decay=False, seed=0, **kw) -> TTTMemory:
    torch.manual_seed(seed)
    cfg = TTTConfig(rule="delta", num_heads=2, head_dim=4, decay=decay, chunk_size=8, init_std=0.3,
                    checkpoint_group_size=2, **kw)
    mem = TTTMemory(cfg, 4, read_lag=lag).double()
    with torch.no_grad():
        for p in mem.parameters():
            p.copy_(0.4 * torch.randn_like(p))
    return mem


def _memory_inputs(B=2, T=29, decay=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, 2, T, 4, generator=g, dtype=F64), dim=-1)
    k = F.normalize(torch.randn(B, 2, T, 4, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, 2, T, 4, generator=g, dtype=F64)
    lr = 0.9 * torch.rand(B, 2, T, generator=g, dtype=F64)
    log_decay = -0.2 * torch.rand(B, 2, T, generator=g, dtype=F64) if decay else None
    return q, k, v, lr, log_decay


def _stream(mem, inputs, sizes, state=None):
    outs, start = [], 0
    for n in sizes:
        part = [None if t is None else t[:, :, start : start + n] for t in inputs]
        out, state = mem(*part[:4], state, part[4])
        outs.append(out)
        start += n
    return torch.cat(outs, 2), state


@pytest.mark.parametrize("lag,decay", [(0, False), (0, True), (3, False), (5, True)])
def test_memory_streamed_cut_anywhere_equals_one_call_and_the_reference(lag, decay):
    mem = _memory(lag, decay)
    inputs = _memory_inputs(decay=decay)
    whole, state = mem(*inputs[:4], None, inputs[4])
    torch.testing.assert_close(whole, reference_memory(mem, *inputs), **TOL)
    rng = random.Random(lag)
    for _ in range(3):
        sizes = []
        while sum(sizes) < 29:
            sizes.append(min(rng.randint(1, 11), 29 - sum(sizes)))
        streamed, streamed_state = _stream(mem, inputs, sizes)
        torch.testing.assert_close(streamed, whole, **TOL)
        for key in state.weights:
            torch.testing.assert_close(streamed_state.weights[key], state.weights[key], **TOL)
    assert state.lengths == (max(lag - 1, 0),) * 2  # the frames a later query still reads unwritten


@pytest.mark.parametrize("lag", [0, 3])
def test_a_reset_inside_a_chunk_is_exact(lag):
    """Sample 0's conversation ends at frame 11 (inside the 8-frame chunk 8..15): from there on it
    equals a fresh memory on its new conversation; sample 1 goes on as if nothing happened."""
    mem = _memory(lag, decay=True)
    inputs = _memory_inputs(T=30, decay=True)
    first = [t[:, :, :11] for t in inputs]
    rest = [t[:, :, 11:] for t in inputs]
    _, state = mem(*first[:4], None, first[4])
    after, _ = _stream(mem, rest, [5, 1, 13], state.reset(torch.tensor([True, False])))
    fresh = mem(*[t[:1] for t in rest[:4]], None, rest[4][:1])[0]
    uninterrupted = mem(*inputs[:4], None, inputs[4])[0]
    torch.testing.assert_close(after[:1], fresh, **TOL)
    torch.testing.assert_close(after[1:], uninterrupted[1:, :, 11:], **TOL)


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_the_minibatch_rule_at_one_frame_is_the_delta_rule(lag):
    """Sun et al.'s gradient step with a mini-batch of 1, no inner LayerNorm and no residual writes
    what the delta rule writes (the bias is the key's extra row): reads and gradients agree."""
    delta = _memory(lag, seed=3, per_position_lr=False)
    gd = TTTMemory(TTTConfig(rule="minibatch_gd", num_heads=2, head_dim=4, mini_batch_size=1, inner_norm=False,
                             inner_residual=False, per_position_lr=False, checkpoint_group_size=3), 4,
                   read_lag=lag).double()
    gd.load_state_dict(delta.state_dict())
    inputs = [t.requires_grad_() for t in _memory_inputs(T=23)[:4]]
    out_delta, _ = delta(*inputs)
    out_gd, _ = gd(*inputs)
    torch.testing.assert_close(out_delta, out_gd, **TOL)
    g = torch.randn(out_delta.shape, dtype=F64)
    params = [delta.initial["W"], delta.initial["b"]]
    a = torch.autograd.grad((out_delta * g).sum(), inputs + params)
    b = torch.autograd.grad((out_gd * g).sum(), inputs + [gd.initial["W"], gd.initial["b"]])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("decay", [False, True])
def test_delta_layer_equals_the_reference_layer(decay):
    torch.manual_seed(4)
    layer = TTTLayer(TTTConfig(rule="delta", num_heads=2, decay=decay, chunk_size=4, checkpoint_group_size=2,
                               init_std=0.3), 8, name="blocks.3.ttt").double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_((1 if "post_norm.weight" in name else 0) + 0.4 * torch.randn_like(p))
    x = torch.randn(2, 19, 8, dtype=F64, requires_grad=True)
    y, _ = layer(x)
    y_ref = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert (layer.decay_proj is not None) == decay
    g = torch.randn(y.shape, dtype=F64)
    for a, b in zip(torch.autograd.grad((y * g).sum(), params + [x]), torch.autograd.grad((y_ref * g).sum(), params + [x])):
        torch.testing.assert_close(a, b, **TOL)
    health = layer.health()
    assert ("decay_mean" in health) == decay and health["fast_weight_norm"] > 0


def test_the_rule_fills_in_its_own_settings_and_refuses_the_other_rules():
    delta = TTTConfig(rule="delta")
    assert (delta.mini_batch_size, delta.inner_norm, delta.inner_residual) == (1, False, False)
    sun = TTTConfig(rule="minibatch_gd")
    assert (sun.mini_batch_size, sun.inner_norm, sun.inner_residual) == (16, True, True)
    for key, value in (("mini_batch_size", 4), ("inner", "mlp"), ("inner_norm", True), ("inner_residual", True),
                       ("weight_norm_clip", 2.0)):
        with pytest.raises(ValueError, match=rf"ttt\.ttt_layer\.{key}=.*does not apply to ttt\.ttt_layer\.rule='delta'"):
            TTTConfig(rule="delta", **{key: value})
    for key in ("rule", "kernel"):
        with pytest.raises(ValueError, match=rf"ttt\.ttt_layer\.{key}='nope' must be one of"):
            TTTConfig(**{key: "nope"})
    assert TTTMemory(TTTConfig(rule="delta", num_heads=2), 8).token_bias is None  # no mini-batch, no position factors


def test_the_kernel_choice_on_a_cpu_machine(caplog):
    """auto runs the torch engine here and says why once; fla asked for by name is an error."""
    mem = _memory(0)
    inputs = _memory_inputs(T=5)[:4]
    fla_kernels._logged.clear()
    with caplog.at_level(logging.INFO, logger="moshi_ttt.ttt"):
        mem(*inputs)
        mem(*inputs)
    chosen = [r.message for r in caplog.records if "delta rule" in r.message]
    assert len(chosen) == 1 and "plain-torch engine" in chosen[0] and "CUDA" in chosen[0]
    mem.config.kernel = "fla"
    with pytest.raises(RuntimeError, match=r"ttt\.ttt_layer\.kernel=fla cannot run here"):
        mem(*inputs)
    reason = fla_kernels.unavailable_reason(torch.device("cuda"), torch.float32, 300, 0, False)
    assert reason is not None  # fla missing here, or the key dim over its limit on a GPU machine
    if fla_kernels.fla_import_error() is None:
        assert "300 > 256" in reason
        lagged = fla_kernels.unavailable_reason(torch.device("cuda"), torch.float32, 65, 3, False)
        assert "read lag" in lagged


def test_checkpointed_chunks_keep_only_boundary_states():
    """With checkpoint groups, what the forward keeps for the backward is the inputs and one state per
    group: per frame it stays flat from 512 to 4096 frames and is a fraction of the full graph's."""

    def saved_bytes(T, group):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        q, k, v, beta, S0, _ = _streams(B=1, H=2, T=T, K=17, V=16)
        inputs = [t.float().requires_grad_() for t in (q, k, v, beta, S0)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, S = chunk_delta_rule(*inputs, chunk_size=64, checkpoint_group_size=group)
        (out.sum() + S.sum()).backward()
        return sum(seen.values()) / T

    inputs_per_frame = 2 * 4 * (17 + 17 + 16 + 1)  # q, k, v, beta in fp32, 2 heads
    short, long = saved_bytes(512, 2), saved_bytes(4096, 2)
    assert long <= 1.1 * short
    assert long <= 1.5 * inputs_per_frame
    assert saved_bytes(4096, 0) > 3 * long


def test_nan_guard_names_the_frame():
    layer = TTTLayer(TTTConfig(rule="delta", num_heads=2), 8, name="blocks.1.ttt")
    x = torch.randn(1, 12, 8)
    x[0, 9] = float("nan")
    with pytest.raises(FloatingPointError, match="blocks.1.ttt.*position 9"):
        layer(x)
