"""Local (sliding-window) attention equals moshi's dense-mask attention, in training and streaming."""

from __future__ import annotations

import copy

import pytest
import torch
from moshi.models.lm import LMGen
from moshi.models.loaders import get_moshi_lm
from moshi.modules.transformer import StreamingMultiheadAttention

from moshi_ttt.models import attention
from moshi_ttt.models.attention import (
    LocalStreamingAttention,
    _flex_local_attention,
    _Plan,
    install_local_attention,
    local_attention,
    remove_local_attention,
)

CONTEXT = 64


@pytest.fixture(params=["fused", "recompute"])
def sdpa_kernel(request, monkeypatch):
    """Run the SDPA path both ways: the fused CPU flash kernel with saved log-sum-exp, and the
    public-SDPA path that recomputes each block in backward (what CUDA uses)."""
    if request.param == "recompute":
        monkeypatch.setattr(attention, "_CPU_FLASH", None)
    return request.param


def dense_reference(q, k, v, window, prefix_k=None, prefix_v=None, prefix_mask=None, chunk=None):
    """Explicit T x T masked softmax: moshi's rule 0 <= t - s < window, plus prefix slots."""
    B, H, T, D = q.shape
    t = torch.arange(T)
    delta = t[:, None] - t[None, :]
    mask = delta >= 0
    if window is not None:
        mask &= delta < window
    mask = mask.expand(B, H, T, T)
    if prefix_k is not None:
        if prefix_k.dim() == 4:
            prefix_k, prefix_v = prefix_k[:, :, None], prefix_v[:, :, None]
        N, M = prefix_k.shape[2:4]
        block = (t // chunk).clamp(max=N - 1) if N > 1 else torch.zeros_like(t)
        slot_block = torch.arange(N).repeat_interleave(M)
        pmask = (block[:, None] == slot_block[None, :]).expand(B, H, T, N * M)
        if prefix_mask is not None:
            pm = prefix_mask
            while pm.dim() < 4:
                pm = pm[None]
            pm = pm.expand(B, H, N, M).reshape(B, H, 1, N * M)
            pmask = pmask & pm
        mask = torch.cat([pmask, mask], -1)
        k = torch.cat([prefix_k.flatten(2, 3), k], 2)
        v = torch.cat([prefix_v.flatten(2, 3), v], 2)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.softmax(scores, -1) @ v, lse


def qkv(B=2, H=3, T=37, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "T,window,chunk",
    [(37, 8, 5), (64, 16, 16), (50, 100, 7), (33, 1, 4), (40, None, 8), (129, 20, None), (1, 4, 3)],
)
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_local_attention_equals_dense(T, window, chunk, backend, sdpa_kernel):
    q, k, v = qkv(T=T)
    ref, ref_lse = dense_reference(q, k, v, window)
    out, lse = local_attention(q, k, v, window, chunk_size=chunk, backend=backend, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)
    plain = local_attention(q, k, v, window, chunk_size=chunk, backend=backend)
    torch.testing.assert_close(plain, ref, atol=1e-10, rtol=0)


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if lse is not None:
        loss = loss + (lse * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    loss.backward()
    return [out, *[t.grad for t in leaves]]


@pytest.mark.parametrize(
    "per_block,masked,with_lse", [(False, False, False), (True, True, True), (False, True, True)]
)
def test_prefix_slots_and_gradients(per_block, masked, with_lse, sdpa_kernel):
    T, W, C, M = 45, 9, 10, 3
    q, k, v = qkv(T=T)
    n = -(-T // C) if per_block else 1
    g = torch.Generator().manual_seed(2)
    shape = (2, 3, n, M, 8) if per_block else (2, 3, M, 8)
    pk, pv = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    pmask = None
    if masked:
        pmask = torch.rand(n, M, generator=g) > 0.4
        pmask[0] = False  # the first block sees no slots at all

    def ours(q, k, v, pk, pv):
        res = local_attention(q, k, v, W, chunk_size=C, prefix_k=pk, prefix_v=pv, prefix_mask=pmask,
                              return_lse=with_lse)
        return res if with_lse else (res, None)

    def ref(q, k, v, pk, pv):
        out, lse = dense_reference(q, k, v, W, pk, pv, pmask, chunk=C)
        return out, (lse if with_lse else None)

    for a, b in zip(_grads(ours, [q, k, v, pk, pv]), _grads(ref, [q, k, v, pk, pv])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_gradients_without_prefix_match_dense(sdpa_kernel):
    q, k, v = qkv(T=70)
    for backend in ("sdpa", "math"):
        def ours_fn(*t, b=backend):
            return local_attention(*t, 12, chunk_size=8, backend=b), None

        ours = _grads(ours_fn, [q, k, v])
        ref = _grads(lambda *t: (dense_reference(*t, 12)[0], None), [q, k, v])
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.filterwarnings("ignore")
def test_flex_mask_semantics_eager_cpu():
    """The FlexAttention mask (used compiled on CUDA) encodes the same window and slots."""
    T, W, C, M = 40, 7, 8, 2
    q, k, v = qkv(T=T, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    pk, pv = (torch.randn(2, 3, T // C, M, 8, generator=g) for _ in range(2))
    pmask = torch.rand(2, 1, T // C, M, generator=g) > 0.3
    plan = _Plan(length=T, window=W, chunk=C, scale=8**-0.5, kernel="sdpa")
    out, lse = _flex_local_attention(q, k, v, plan, pk, pv, pmask, return_lse=True, compiled=False)
    ref, ref_lse = dense_reference(q, k, v, W, pk, pv, pmask, chunk=C)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    out = _flex_local_attention(q, k, v, plan, None, None, None, return_lse=False, compiled=False)[0]
    torch.testing.assert_close(out, dense_reference(q, k, v, W)[0], atol=1e-5, rtol=0)


def test_memory_stays_linear(sdpa_kernel):
    """Nothing of size T x T (or T x W) is kept for backward: q, k, v (+ out, lse) and a mask."""
    q, k, v = (t.float().requires_grad_() for t in qkv(B=1, H=2, T=3000, D=16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = local_attention(q, k, v, 256, chunk_size=64)
    assert sum(saved) <= 4 * q.numel() + 2 * 3000 + 64 * (64 + 255)
    out.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


def test_bad_arguments_are_named():
    q, k, v = qkv(T=10)
    with pytest.raises(ValueError, match="backend"):
        local_attention(q, k, v, 4, backend="cudnn")
    with pytest.raises(ValueError, match="window"):
        local_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="prefix_k and prefix_v"):
        local_attention(q, k, v, 4, prefix_k=q[:, :, :2])
    with pytest.raises(ValueError, match="explicit chunk_size"):
        local_attention(q, k, v, 4, prefix_k=q[:, :, None, :2].expand(-1, -1, 3, -1, -1),
                        prefix_v=v[:, :, None, :2].expand(-1, -1, 3, -1, -1))


# ---------------------------------------------------------------- inside moshi's LMModel


@pytest.fixture(scope="module")
def vanilla(tiny_lm_kwargs):
    """The project's tiny Moshi with a short context, so that T > context is cheap."""
    torch.manual_seed(0)
    kwargs = {**tiny_lm_kwargs, "context": CONTEXT}
    return get_moshi_lm(None, lm_kwargs=kwargs, device="cpu", dtype=torch.float32)


def local_copy(lm, **kw):
    other = copy.deepcopy(lm)
    install_local_attention(other, **kw)
    return other


def codes(lm, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm.text_card, (2, 1, T), generator=g)
    audio = torch.randint(0, lm.card, (2, lm.num_codebooks - 1, T), generator=g)
    return torch.cat([text, audio], 1)


def assert_same_logits(a, b, atol=1e-5):
    torch.testing.assert_close(a.logits, b.logits, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(a.text_logits, b.text_logits, atol=atol, rtol=0, equal_nan=True)


@pytest.mark.parametrize("T", [150, 40])
def test_lm_logits_equal_moshi(vanilla, T):
    local = local_copy(vanilla, chunk_size=16)
    assert all(isinstance(layer.self_attn, LocalStreamingAttention) for layer in local.transformer.layers)
    assert all(layer.self_attn.window == CONTEXT for layer in local.transformer.layers)
    with torch.no_grad():
        assert_same_logits(local(codes(vanilla, T)), vanilla(codes(vanilla, T)))


def test_per_layer_windows(vanilla):
    local = local_copy(vanilla, window={0: 10, 1: 100})
    ref = copy.deepcopy(vanilla)
    ref.transformer.layers[0].self_attn.context = 10
    ref.transformer.layers[1].self_attn.context = 100
    with torch.no_grad():
        assert_same_logits(local(codes(vanilla, 130)), ref(codes(vanilla, 130)))
    with pytest.raises(ValueError, match="out of range"):
        install_local_attention(local, window={5: 10})


def test_gradients_match_moshi(vanilla):
    local = local_copy(vanilla, window=24, chunk_size=8)
    ref = copy.deepcopy(vanilla)
    for layer in ref.transformer.layers:
        layer.self_attn.context = 24
    checkpointed = local_copy(vanilla, window=24, chunk_size=8)
    checkpointed.transformer.checkpointing = True
    x = codes(vanilla, 60)
    grads = []
    for model in (ref, local, checkpointed):
        model.zero_grad()
        out = model(x)
        g = torch.Generator().manual_seed(5)
        logits = torch.nan_to_num(out.logits) * torch.randn(out.logits.shape, generator=g)
        (logits.sum() + torch.nan_to_num(out.text_logits).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.transformer.named_parameters()})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, g in other.items():
            scale = grads[0][name].abs().max().item()
            torch.testing.assert_close(g, grads[0][name], atol=1e-5 * scale, rtol=0, msg=name)


def test_streaming_uses_the_same_window(vanilla):
    """Teacher-forced steps through moshi's streaming path equal the local training forward."""
    window, T = 16, 50
    local = local_copy(vanilla, window=window)
    assert all(layer.self_attn.context == window for layer in local.transformer.layers)
    seq = codes(vanilla, T)[:1]
    with torch.no_grad():
        full, _ = local.forward_text(seq)
        with local.streaming(1):
            steps = [local.forward_text(seq[:, :, t: t + 1])[0] for t in range(T)]
        ref = copy.deepcopy(vanilla)
        for layer in ref.transformer.layers:
            layer.self_attn.context = window
        dense, _ = ref.forward_text(seq)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense, full, atol=1e-5, rtol=0)


def test_lmgen_runs_past_the_window(vanilla):
    local = local_copy(vanilla, window=8)
    gen = LMGen(local, temp=1.0, temp_text=1.0, top_k=10, top_k_text=10)
    user = codes(vanilla, 30)[:1, 1 + local.dep_q:]
    out = []
    with torch.no_grad(), gen.streaming(1):
        for t in range(30):
            frame = gen.step(user[:, :, t: t + 1])
            if frame is not None:
                out.append(frame)
    assert len(out) == 30 - max(local.delays)
    assert torch.cat(out, -1).shape == (1, 1 + local.dep_q, len(out))
    with local.streaming(1), pytest.raises(RuntimeError, match="streaming"):
        install_local_attention(local, window=4)


def test_state_dict_is_unchanged_and_reversible(vanilla):
    local = local_copy(vanilla, window=12)
    before = vanilla.state_dict()
    after = local.state_dict()
    assert list(before) == list(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    local.load_state_dict(before, strict=True)
    assert remove_local_attention(local) == len(local.transformer.layers)
    assert all(type(layer.self_attn) is StreamingMultiheadAttention for layer in local.transformer.layers)
    assert all(layer.self_attn.context == CONTEXT for layer in local.transformer.layers)
    depformer_types = {type(m) for m in local.depformer.modules()}
    assert LocalStreamingAttention not in depformer_types
