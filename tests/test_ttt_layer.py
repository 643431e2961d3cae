"""TTT layers against ``moshi_ttt.ttt.reference``: explicit per-token gradients with autograd, float64.

The reference never uses the dual form, the manual LayerNorm gradient or the scan: for every
mini-batch it takes each token's inner-loss gradient at the mini-batch's start weights with
torch.autograd.grad, builds the weights W_i each position reads explicitly, and commits the
last position's weights when the mini-batch is full.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
import torch

from moshi_ttt.ttt import TTTConfig, TTTLayer, TTTMemory, TTTState, check_stage_mini_batch, ttt_scan
from moshi_ttt.ttt.reference import reference_layer, reference_memory

DIM = 8  # 2 heads of 4
TOL = {"rtol": 1e-8, "atol": 1e-8}


# ----------------------------------------------------------------------------- helpers


def make_layer(inner="linear", b=4, seed=0, **kw) -> TTTLayer:
    """A float64 layer with every parameter random (non-zero out proj, gate, offsets) so grads are real."""
    torch.manual_seed(seed)
    kw.setdefault("checkpoint_group_size", 2)
    cfg = TTTConfig(rule="minibatch_gd", num_heads=2, inner=inner, mini_batch_size=b, mlp_expansion=2, init_std=0.3, **kw)
    layer = TTTLayer(cfg, DIM, name="blocks.3.ttt").double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "ln_weight" in name or "post_norm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "token_bias" in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "lr_proj" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.4 * torch.randn_like(p))
    return layer


def grads_of(module, out, *inputs):
    """Gradients of a fixed random projection of ``out`` w.r.t. all parameters and the inputs."""
    gen = torch.Generator().manual_seed(123)
    proj = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    gs = torch.autograd.grad((out * proj).sum(), params + list(inputs), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, params + list(inputs))]


def assert_all_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **(tol or TOL))


def stream(layer, x, sizes, state=None):
    ys, start = [], 0
    for n in sizes:
        y, state = layer(x[:, start : start + n], state)
        ys.append(y)
        start += n
    assert start == x.shape[1]
    return torch.cat(ys, dim=1), state


def random_chunks(T, rng, max_chunk=7):
    sizes = []
    while sum(sizes) < T:
        sizes.append(min(rng.randint(1, max_chunk), T - sum(sizes)))
    return sizes


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("b,T", [(1, 5), (4, 12), (4, 14), (16, 32), (16, 21)])
def test_dual_form_matches_reference(inner, b, T):
    layer = make_layer(inner, b, seed=b + T)
    x = torch.randn(2, T, DIM, dtype=torch.float64, requires_grad=True)  # two different samples
    y, state = layer(x)
    y_ref = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert y.abs().max() > 1e-3  # a real signal, not a zero output compared with zero
    assert_all_close(grads_of(layer, y, x), grads_of(layer, y_ref, x))
    assert state.lengths == (T % b,) * 2 and state.positions == (T, T)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("seed,residual", [(5, True), (7, True), (5, False)])
def test_layer_without_inner_norm_matches_reference(inner, seed, residual):
    # inner_norm=false: f(x) = x + g(x), the delta rule; the same dual form with the LN left out.
    # inner_residual=false as well: f(x) = g(x), reconstructing v (not v - k), reads without q.
    layer = make_layer(inner, 4, seed=seed, inner_norm=False, inner_residual=residual)
    assert not any("ln_" in n for n, _ in layer.named_parameters())  # nothing left to learn there
    x = torch.randn(2, 14, DIM, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    y_ref = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert_all_close(grads_of(layer, y, x), grads_of(layer, y_ref, x))
    other = make_layer(inner, 4, seed=seed, inner_norm=residual, inner_residual=not residual)
    assert not torch.allclose(other(x)[0], y)  # the options change what is computed


def test_weight_norm_clip_matches_reference_and_bounds_weights():
    layer = make_layer("mlp", 4, seed=3, weight_norm_clip=1.5)
    x = torch.randn(2, 13, DIM, dtype=torch.float64, requires_grad=True)
    y, state = layer(x)
    y_ref = reference_layer(layer, x)
    torch.testing.assert_close(y, y_ref, **TOL)
    assert_all_close(grads_of(layer, y, x), grads_of(layer, y_ref, x))
    for w in state.weights.values():
        assert w.flatten(2).norm(dim=-1).max() <= 1.5 + 1e-12
    unclipped = make_layer("mlp", 4, seed=3)(x)[1]
    assert max(w.flatten(2).norm(dim=-1).max() for w in unclipped.weights.values()) > 1.5  # clip was active


@pytest.mark.parametrize("inner_norm,residual", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("lag", [0, 1, 2, 3])
def test_lagged_read_of_separate_stream_matches_reference(inner, lag, inner_norm, residual):
    torch.manual_seed(lag)
    layer = make_layer(inner, 4, seed=lag, inner_norm=inner_norm, inner_residual=residual)
    mem = TTTMemory(layer.config, 4, read_lag=lag).double()
    mem.load_state_dict(layer.memory.state_dict())
    B, H, T, d = 2, 2, 19, 4
    xq, xk, xv = (torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lr = (0.1 * torch.rand(B, H, T, dtype=torch.float64)).requires_grad_()
    out, state = mem(xq, xk, xv, lr)
    ref = reference_memory(mem, xq, xk, xv, lr)
    torch.testing.assert_close(out, ref, **TOL)
    assert_all_close(grads_of(mem, out, xq, xk, xv, lr), grads_of(mem, ref, xq, xk, xv, lr))
    # the write stream stays unwritten for the lagged mini-batches the next read still needs unseen
    assert state.lengths == ((T % 4) + 4 * max(lag - 1, 0),) * B
    # queries never influence the memory, and a read at lag >= 1 never sees its own mini-batch
    if lag:
        probe = xk.detach().clone()
        probe[:, :, 4:] += 1.0  # mini-batch 1 onwards
        out2, _ = mem(xq, probe, xv, lr)
        changes = (out2 - out).abs().amax(dim=(0, 1, 3))
        assert int(changes.nonzero()[0]) == 4 * (1 + lag)


def test_functional_scan_matches_memory_module():
    layer = make_layer("linear", 4, seed=5)
    mem = layer.memory
    B, H, T, d = 2, 2, 11, 4
    xq, xk, xv = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    lr = 0.1 * torch.rand(B, H, T, dtype=torch.float64)
    w0 = {k: v.unsqueeze(0).expand(B, *v.shape) for k, v in mem.initial.items()}
    out, w = ttt_scan(
        mem.inner, w0, xq, xk, xv, lr, mem.token_eta(dtype=torch.float64), mem.ln_weight, mem.ln_bias,
        mini_batch_size=4, ln_eps=mem.config.ln_eps,
    )  # fmt: skip
    out_mod, state = mem(xq, xk, xv, lr)
    torch.testing.assert_close(out, out_mod, rtol=0, atol=0)
    for k in w:
        torch.testing.assert_close(w[k], state.weights[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_commit"):
        ttt_scan(mem.inner, w0, xq, xk, xv, lr, mem.token_eta(dtype=torch.float64), mem.ln_weight,
                 mem.ln_bias, mini_batch_size=4, num_commit=0)  # fmt: skip


# ----------------------------------------------------------------------------- streaming and state


@pytest.mark.parametrize("inner,b", [("linear", 4), ("mlp", 3)])
def test_streaming_equivalence_random_chunkings(inner, b):
    layer = make_layer(inner, b, seed=11)
    T = 23
    x = torch.randn(2, T, DIM, dtype=torch.float64, requires_grad=True)
    y_full, st_full = layer(x)
    g_full = grads_of(layer, y_full, x)
    rng = random.Random(0)
    chunkings = [[1] * T, [b + 1] * (T // (b + 1)) + [T % (b + 1)], [T]]
    chunkings += [random_chunks(T, rng) for _ in range(3)]
    for sizes in chunkings:
        sizes = [s for s in sizes if s]
        y, st = stream(layer, x, sizes)
        torch.testing.assert_close(y, y_full, rtol=1e-10, atol=1e-10)
        for k in st.weights:
            torch.testing.assert_close(st.weights[k], st_full.weights[k], rtol=1e-10, atol=1e-10)
        assert st.lengths == st_full.lengths and st.positions == (T, T)
    # gradients flow through the carried state exactly as through the full pass
    y, _ = stream(layer, x, random_chunks(T, rng))
    assert_all_close(grads_of(layer, y, x), g_full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("lag", [1, 3])
def test_lagged_memory_streams_like_the_full_pass(lag):
    layer = make_layer("mlp", 4, seed=2)
    mem = TTTMemory(layer.config, 4, read_lag=lag).double()
    mem.load_state_dict(layer.memory.state_dict())
    xq, xk, xv = (torch.randn(2, 2, 30, 4, dtype=torch.float64) for _ in range(3))
    lr = 0.1 * torch.rand(2, 2, 30, dtype=torch.float64)
    full, st_full = mem(xq, xk, xv, lr)
    rng = random.Random(lag)
    for sizes in ([1] * 30, random_chunks(30, rng, 9)):
        state, outs, t0 = None, [], 0
        for n in sizes:
            o, state = mem(xq[:, :, t0 : t0 + n], xk[:, :, t0 : t0 + n], xv[:, :, t0 : t0 + n],
                           lr[:, :, t0 : t0 + n], state)  # fmt: skip
            outs.append(o)
            t0 += n
        torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-10, atol=1e-10)
        assert state.lengths == st_full.lengths


def test_samples_never_share_state():
    layer = make_layer("linear", 4, seed=4)
    x = torch.randn(3, 10, DIM, dtype=torch.float64)
    y, st = layer(x)
    for s in range(3):
        y_s, st_s = layer(x[s : s + 1])
        torch.testing.assert_close(y[s : s + 1], y_s, rtol=1e-12, atol=1e-12)
        for k in st.weights:
            torch.testing.assert_close(st.weights[k][s : s + 1], st_s.weights[k], rtol=1e-12, atol=1e-12)
    x2 = x.clone()
    x2[2] = torch.randn(10, DIM, dtype=torch.float64)
    y2, st2 = layer(x2)
    assert torch.equal(y2[:2], y[:2]) and not torch.allclose(y2[2], y[2])
    assert all(torch.equal(st2.weights[k][:2], st.weights[k][:2]) for k in st.weights)


def test_reset_subset_mid_mini_batch():
    layer = make_layer("mlp", 4, seed=6)
    a = torch.randn(2, 6, DIM, dtype=torch.float64)  # conversation 1 of both samples (6 = 1.5 mini-batches)
    b = torch.randn(2, 9, DIM, dtype=torch.float64)
    _, state = layer(a)
    state.reset(torch.tensor([True, False]))
    assert state.lengths == (0, 2) and state.positions == (0, 6)
    for k, w in state.weights.items():
        torch.testing.assert_close(w[0], layer.memory.initial[k], rtol=0, atol=0)
    # sample 0 now sits at another mini-batch phase than sample 1: stream the rest in odd chunks
    y, state = stream(layer, b, [1, 3, 2, 3], state)
    y0_fresh, _ = layer(b[:1])  # sample 0: a brand-new conversation
    y1_cont, _ = layer(torch.cat([a[1:], b[1:]], dim=1))  # sample 1: one uninterrupted conversation
    torch.testing.assert_close(y[:1], y0_fresh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[1:], y1_cont[:, 6:], rtol=1e-10, atol=1e-10)
    assert state.positions == (9, 15)


def test_state_select_cat_detach_clone():
    layer = make_layer("linear", 4, seed=7)
    x = torch.randn(3, 7, DIM, dtype=torch.float64, requires_grad=True)
    _, st = layer(x)
    st.reset([False, True, False])
    joined = TTTState.cat([st.select([2]), st.select([0, 1])]).select([1, 2, 0])
    for k in st.weights:
        assert torch.equal(joined.weights[k], st.weights[k])
    assert joined.lengths == st.lengths and torch.equal(joined.buf_k, st.buf_k)
    picked = st[torch.tensor([True, False, True])]
    assert picked.positions == st[[0, 2]].positions == st[::2].positions == (7, 7)
    assert torch.equal(picked.weights["W"], st.weights["W"][[0, 2]]) and st[1].lengths == (0,)
    det = st.detach()
    assert not det.weights["W"].requires_grad and det.init["W"] is layer.memory.initial["W"]
    cl = st.clone()
    assert cl.weights["W"].data_ptr() != st.weights["W"].data_ptr() and torch.equal(cl.buf_v, st.buf_v)
    with pytest.raises(ValueError, match="batch size 3"):
        st.reset([True])


def test_forward_never_writes_parameters():
    layer = make_layer("mlp", 4, seed=8)
    before = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    y, state = layer(torch.randn(2, 9, DIM, dtype=torch.float64))
    y, state = layer(torch.randn(2, 5, DIM, dtype=torch.float64), state)
    y.sum().backward()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


# ----------------------------------------------------------------------------- guards and training mechanics


def test_nan_guard_names_layer_and_position():
    layer = make_layer("linear", 4, seed=9)
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    x[1, 6, 3] = float("nan")
    with pytest.raises(
        FloatingPointError, match=r"'blocks\.3\.ttt'.*input is already non-finite at sample 1, position 6"
    ):
        layer(x)
    _, state = layer(x[:, :5])
    with pytest.raises(FloatingPointError, match=r"sample 1, position 6 \(index 1 of this chunk"):
        layer(x[:, 5:], state)
    with torch.no_grad():
        layer.memory.initial["W"][1, 0, 0] = float("inf")  # a diverged memory, finite input
    with pytest.raises(
        FloatingPointError,
        match=r"'blocks\.3\.ttt'.*sample 0, position 0 .*finite input: the fast weights diverged",
    ):
        layer(torch.randn(1, 4, DIM, dtype=torch.float64))
    layer.config.nan_guard = False
    y, _ = layer(torch.randn(1, 4, DIM, dtype=torch.float64))
    assert not torch.isfinite(y).all()


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_checkpointed_scan_gives_identical_grads(inner):
    x = torch.randn(2, 27, DIM, dtype=torch.float64, requires_grad=True)
    results = []
    for group in (0, 1, 3, 50):
        layer = make_layer(inner, 4, seed=10, checkpoint_group_size=group)
        y, _ = layer(x)
        results.append((y, grads_of(layer, y, x)))
    for y, g in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=0, atol=1e-13)
        assert_all_close(g, results[0][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_bf16_autocast_keeps_the_inner_loop_in_fp32(inner):
    torch.manual_seed(0)
    cfg = TTTConfig(rule="minibatch_gd", num_heads=2, inner=inner, mini_batch_size=4, output_proj=True)
    layer = TTTLayer(cfg, 16, name="ttt")
    with torch.no_grad():
        layer.out_proj.weight.normal_(0, 0.1)
    x = torch.randn(2, 10, 16)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
        y, state = layer(x[:, :3], state)
    assert all(w.dtype == torch.float32 for w in state.weights.values())
    assert state.buf_k.dtype == torch.float32 and state.buf_lr.dtype == torch.float32
    assert y.dtype == x.dtype and torch.isfinite(y).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert (y - y32).abs().max() < 0.05 * y32.abs().max()  # bf16 projections, fp32 memory
    layer_bf16 = layer.to(torch.bfloat16)  # a model cast to bf16 still keeps fp32 fast weights
    y, state = layer_bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert all(w.dtype == torch.float32 for w in state.weights.values())


def test_health_stats_and_gated_zero_start():
    cfg = TTTConfig(rule="minibatch_gd", num_heads=2, mini_batch_size=4)
    layer = TTTLayer(cfg, 16, name="ttt")
    x = torch.randn(2, 9, 16)
    y, _ = layer(x)
    assert torch.equal(y, torch.zeros_like(y))  # zero-init output projection: Moshi starts unchanged
    h = layer.health()
    keys = {"fast_weight_norm", "fast_weight_norm_max", "fast_weight_mean", "fast_weight_std", "eta_mean",
            "eta_min", "eta_max", "gate_mean_abs", "out_in_norm_ratio"}  # fmt: skip
    assert keys <= set(h) and all(isinstance(v, float) and math.isfinite(v) for v in h.values())
    assert h["gate_mean_abs"] == pytest.approx(math.tanh(0.1))
    assert h["out_in_norm_ratio"] == 0.0
    assert 0 < h["eta_min"] <= h["eta_mean"] <= h["eta_max"] <= cfg.base_lr / 8
    cfg = TTTConfig(rule="minibatch_gd", num_heads=2, mini_batch_size=4, output_proj=False, eta_max=0.01)
    layer = TTTLayer(cfg, 16)
    y, _ = layer(x)
    h = layer.health()
    assert h["out_in_norm_ratio"] > 0 and h["eta_max"] == pytest.approx(0.01)


def test_config_errors_name_the_hydra_key():
    """Every message names the key as a user sets it (ttt.ttt_layer.<field>), never a key that does not exist."""
    with pytest.raises(ValueError, match=r"^ttt\.ttt_layer\.inner='rnn' must be one of"):
        TTTConfig(rule="minibatch_gd", inner="rnn")
    with pytest.raises(ValueError, match=r"^ttt\.ttt_layer\.mini_batch_size=0 is out of range"):
        TTTConfig(rule="minibatch_gd", mini_batch_size=0)
    with pytest.raises(ValueError, match=r"^ttt\.ttt_layer\.num_heads=3 does not divide .* set ttt\.ttt_layer\.head_dim"):
        TTTLayer(TTTConfig(rule="minibatch_gd", num_heads=3), 16)
    with pytest.raises(ValueError, match=r"^ttt\.ttt_layer\.output_proj=false"):
        TTTLayer(TTTConfig(rule="minibatch_gd", num_heads=2, head_dim=4, output_proj=False), 16)
    # one default for both inner models, and TTTConfig is the schema of ttt.ttt_layer: its defaults are the only ones
    from moshi_ttt.config.schema import TTTVariantConfig

    assert TTTConfig(rule="minibatch_gd", inner="mlp").mini_batch_size == TTTConfig(rule="minibatch_gd").mini_batch_size == 16
    assert TTTVariantConfig().ttt_layer.resolved() == TTTConfig() and TTTConfig().rule == "delta"
    assert not (Path(__file__).parents[1] / "conf/ttt/_layer_defaults.yaml").exists()


def test_divergence_message_names_existing_keys():
    layer = make_layer("linear", 4, seed=9)
    with torch.no_grad():
        layer.memory.initial["W"][0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError) as info:
        layer(torch.randn(1, 4, DIM, dtype=torch.float64))
    keys = re.findall(r"ttt\.[a-z_.]+", str(info.value))
    assert keys == ["ttt.ttt_layer.base_lr", "ttt.ttt_layer.eta_max", "ttt.ttt_layer.weight_norm_clip"]
    fields = set(TTTConfig.__dataclass_fields__)
    assert all(k.removeprefix("ttt.ttt_layer.") in fields for k in keys)


def test_stage_mini_batch_rule_names_both_keys():
    check_stage_mini_batch(None, 16, "curriculum.stages.0.ttt_mini_batch_size")
    check_stage_mini_batch(16, 16, "curriculum.stages.0.ttt_mini_batch_size")
    with pytest.raises(ValueError, match=r"^curriculum\.stages\.1\.ttt_mini_batch_size=32 differs from "
                                         r"ttt\.ttt_layer\.mini_batch_size=16"):
        check_stage_mini_batch(32, 16, "curriculum.stages.1.ttt_mini_batch_size")
