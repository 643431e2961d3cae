"""The TTT variants inside Moshi: starting point, "is TTT used", streaming (LMGen) == training."""

from __future__ import annotations

import pytest
import torch
from moshi.models.lm import LMGen

from helpers import open_trainables as _open_gates
from helpers import random_codes as _codes
from helpers import tiny_variant_model
from moshi_ttt.models import MoshiSourceConfig, load_base_moshi
from moshi_ttt.models.insert import install_ttt, selected_layers, set_ttt_enabled

VARIANTS = ["pre_attention", "post_attention", "hybrid", "cache_replacement", "cache_replacement:kv_slots"]


def _model(kw, variant, window=16, context=64, seed=0):
    """``variant`` may name a read mode after a colon (cache_replacement:kv_slots)."""
    return tiny_variant_model(kw, variant, window, context=context, seed=seed)


def test_layer_selection():
    assert selected_layers({}, 32) == [29, 30, 31]
    assert selected_layers({"layer_indices": [24, -1]}, 32) == [24, 31]
    with pytest.raises(ValueError, match="ttt.layer_indices"):
        selected_layers({"layer_indices": [40]}, 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_closed_gates_equal_the_base_and_open_gates_differ(tiny_lm_kwargs, variant):
    # A window as long as the sequence: with TTT closed the model is the frozen base.
    base, model = _model(tiny_lm_kwargs, variant, window=64)
    codes = _codes(tiny_lm_kwargs)
    with torch.no_grad():
        ref = base(codes).logits.nan_to_num()
        out = model(codes).logits.nan_to_num()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        _open_gates(model)
        used = model(codes).logits.nan_to_num()
        assert (used - ref).abs().max() > 1e-3  # TTT is used
        set_ttt_enabled(model, False)
        off = model(codes).logits.nan_to_num()
    torch.testing.assert_close(off, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_0_is_the_frozen_model_with_the_variants_window(tiny_lm_kwargs, variant):
    """Untrained, every variant is exactly the frozen base whose TTT layers attend over the
    variant's window (hybrid: ttt.ttt_layer_attention_window at full strength; cache_replacement: its recent window;
    pre/post: the base's own context), however short that window is."""
    from moshi_ttt.models.attention import install_local_attention

    base, model = _model(tiny_lm_kwargs, variant, window=8)
    windows = {}
    for i, layer in enumerate(model.transformer.layers):
        attn = layer.layer.self_attn if hasattr(layer, "placement") else layer.self_attn
        windows[i] = int(attn.context)
    assert min(windows.values()) < 64 or variant.split(":")[0] in ("pre_attention", "post_attention")
    install_local_attention(base, windows)
    codes = _codes(tiny_lm_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(model(codes).logits.nan_to_num(), base(codes).logits.nan_to_num(),
                                   atol=1e-5, rtol=0)


#: the memories besides the product's (the delta rule): chunks of 4 frames, so a 40-frame training forward
#: crosses many; its decay; Sun et al.'s mini-batch rule, with and without its LayerNorm and residual
MEMORIES = {
    "delta_chunks": {"ttt_layer": {"chunk_size": 4}},
    "delta_decay": {"ttt_layer": {"chunk_size": 4, "decay": True}},
    "minibatch_gd": {"ttt_layer": {"rule": "minibatch_gd", "mini_batch_size": 4}},
    "minibatch_gd_associative": {"ttt_layer": {"rule": "minibatch_gd", "mini_batch_size": 2, "inner_norm": False,
                                               "inner_residual": False, "base_lr": 16.0},
                                 "init_from_attention": True, "memory_key_adapter": True},
}


@pytest.mark.parametrize("variant,memory", [*((v, None) for v in ["none", *VARIANTS]),
                                            *((v, "delta_chunks") for v in VARIANTS),
                                            *((v, "minibatch_gd") for v in VARIANTS),
                                            ("hybrid", "minibatch_gd_associative"),
                                            ("cache_replacement:kv_slots", "minibatch_gd_associative"),
                                            ("pre_attention", "delta_decay"), ("cache_replacement", "delta_decay")])
def test_lmgen_streaming_equals_training_forward(tiny_lm_kwargs, variant, memory):
    """LMGen, one frame per step (user and Moshi audio teacher-forced), gives per frame the same
    text logits and transformer outputs as the training forward over the same input tokens."""
    _, model = tiny_variant_model(tiny_lm_kwargs, variant, 8, context=24, **MEMORIES.get(memory, {}))
    _open_gates(model)
    B, steps = 2, 40
    codes = _codes(tiny_lm_kwargs, B=B, T=steps, seed=3)
    inputs, outs = [], []
    original = model.forward_text

    def recording_forward_text(seq, *args, **kwargs):
        out = original(seq, *args, **kwargs)
        inputs.append(seq.clone())
        outs.append(tuple(o.clone() for o in out))
        return out

    model.forward_text = recording_forward_text
    gen = LMGen(model, use_sampling=False)
    with torch.no_grad(), gen.streaming(B):
        for t in range(steps):
            gen.step(codes[:, 9:17, t : t + 1], depformer_replace_tokens=codes[:, 1:9, t : t + 1])
    del model.forward_text
    seq = torch.cat(inputs, dim=2)
    with torch.no_grad():
        full_out, full_logits = model.forward_text(seq)
    stream_out = torch.cat([o[0] for o in outs], dim=1)
    stream_logits = torch.cat([o[1] for o in outs], dim=2)
    torch.testing.assert_close(stream_out, full_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stream_logits, full_logits, atol=2e-5, rtol=1e-4)


def test_pre_attention_scales_only_the_reads_gradient_through_its_attention(tiny_lm_kwargs):
    """ttt.read_grad_through_attention changes training, not the model: the forward is the same
    bit for bit, and the TTT's gradients move linearly between "only through the residual" (0) and
    the plain gradient (1)."""
    from moshi_ttt.models.variants.pre_attention import scale_grad

    x = torch.randn(3, requires_grad=True)
    (scale_grad(x, 0.25) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(scale_grad(x, 0.25), x) and torch.equal(x.grad, torch.tensor([0.25, 0.5, 0.75]))
    codes = _codes(tiny_lm_kwargs)
    logits, grads = {}, {}
    for share in (0.0, 0.5, 1.0):
        _, model = tiny_variant_model(tiny_lm_kwargs, "pre_attention", 16, read_grad_through_attention=share,
                                      layer_indices=[-1])  # one TTT layer: its gradient is linear in the share
        _open_gates(model)
        out = model(codes).logits.nan_to_num()
        out.square().mean().backward()
        logits[share] = out.detach()
        grads[share] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert torch.equal(logits[0.0], logits[1.0]) and torch.equal(logits[0.5], logits[1.0])
    assert (grads[1.0] - grads[0.0]).abs().max() > 1e-4  # the attention's path carries a gradient
    torch.testing.assert_close(grads[0.5], (grads[0.0] + grads[1.0]) / 2, atol=1e-6, rtol=1e-4)


def test_reset_streaming_restarts_the_memory(tiny_lm_kwargs):
    _, model = _model(tiny_lm_kwargs, "pre_attention")
    _open_gates(model)
    x = torch.randn(2, 12, tiny_lm_kwargs["dim"])
    with torch.no_grad(), model.transformer.streaming(2):
        first = torch.cat([model.transformer(x[:, t : t + 1]) for t in range(12)], 1)
        model.transformer.reset_streaming(torch.tensor([True, False]))
        again = torch.cat([model.transformer(x[:, t : t + 1]) for t in range(12)], 1)
    torch.testing.assert_close(again[0], first[0], atol=1e-6, rtol=0)  # sample 0 starts over
    assert (again[1] - first[1]).abs().max() > 1e-4  # sample 1 carries its history


def test_only_ttt_parameters_train(tiny_lm_kwargs):
    _, model = _model(tiny_lm_kwargs, "cache_replacement")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(any(k in n for k in ("memory.", "lr_proj", "read_norm", "read_proj", "gate_alpha"))
                         for n in names)


@pytest.mark.parametrize("variant,memory", [("pre_attention", None), ("cache_replacement", None),
                                            ("cache_replacement:kv_slots", None), ("pre_attention", "delta_decay"),
                                            ("cache_replacement", "minibatch_gd")])
def test_packed_conversations_reset_the_memory_at_boundaries(tiny_lm_kwargs, variant, memory):
    """With segment ids in context, the TTT output of a later conversation equals that of the
    same conversation run alone (fresh memory); without them, the memory carries over."""
    from moshi_ttt.models.segments import segment_context

    _, model = tiny_variant_model(tiny_lm_kwargs, variant, 8, **MEMORIES.get(memory, {}))
    _open_gates(model)
    module = next(m for m in model.modules() if hasattr(m, "ttt_enabled"))
    if variant == "pre_attention":
        run = module._ttt
    elif variant.endswith("kv_slots"):
        run = lambda x: module(x, x, x)  # noqa: E731 - the whole layer runs per conversation
    else:
        run = module._memory_update
    x = torch.randn(1, 40, tiny_lm_kwargs["dim"])
    segments = torch.zeros(1, 40, dtype=torch.long)
    segments[:, 23:] = 1
    with torch.no_grad():
        with segment_context(segments):
            packed = run(x)
        alone = run(x[:, 23:])
        carried = run(x)
    torch.testing.assert_close(packed[:, 23:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, :23], carried[:, :23], atol=1e-5, rtol=1e-5)
    assert (carried[:, 23:] - alone).abs().max() > 1e-5


@pytest.mark.parametrize("read", ["add", "kv_slots"])
def test_cache_replacement_remembers_what_left_the_window(tiny_lm_kwargs, read):
    """A frame far outside the attention window still changes late outputs through the memory
    (and only through it: with the memory off, the late outputs ignore it)."""
    _, model = _model(tiny_lm_kwargs, f"cache_replacement:{read}", window=4)
    _open_gates(model)
    module = next(m for m in model.modules() if hasattr(m, "memory"))
    x = torch.randn(1, 48, tiny_lm_kwargs["dim"])
    y = x.clone()
    y[:, 2] += 3.0  # frame 2; the window is (ceil(4/4) + 1) * 4 = 8 frames
    with torch.no_grad():
        late = module(x, x, x)[:, 24:]
        changed = module(y, y, y)[:, 24:]
        set_ttt_enabled(model, False)
        torch.testing.assert_close(module(x, x, x)[:, 24:], module(y, y, y)[:, 24:], atol=1e-6, rtol=0)
    assert (late - changed).abs().max() > 1e-4


def test_kv_slots_start_closed_and_can_open(tiny_lm_kwargs):
    """At step 0 the slot gate is 0 (the frozen base) yet receives a gradient, so it can open."""
    base, model = _model(tiny_lm_kwargs, "cache_replacement:kv_slots", window=64)  # the base's context
    codes = _codes(tiny_lm_kwargs, T=40)
    out = model(codes)
    torch.testing.assert_close(out.logits.nan_to_num(), base(codes).logits.nan_to_num(), atol=1e-5, rtol=0)
    out.logits.nan_to_num().pow(2).mean().backward()
    gates = [m.gate_alpha for m in model.modules() if hasattr(m, "slot_key")]
    assert len(gates) == 2 and all(float(g.detach().abs().max()) == 0.0 for g in gates)
    assert all(float(g.grad.abs().max()) > 0 for g in gates)


def test_kv_slots_is_addressed_by_the_query(tiny_lm_kwargs):
    """The slot's value is the memory read at the query itself: two queries at the same position
    with the same history read different values (fixed probes would give both the same)."""
    _, model = _model(tiny_lm_kwargs, "cache_replacement:kv_slots", window=4)
    _open_gates(model)
    module = next(m for m in model.modules() if hasattr(m, "slot_key"))
    x = torch.randn(2, 32, tiny_lm_kwargs["dim"])
    x[1, :-1] = x[0, :-1]  # same history, different last frame
    q0, k0, v, lr, log_decay = module._memory_inputs(x)
    with torch.no_grad():
        read, _ = module._lagged_read(q0, k0, v, lr, log_decay)
    assert (read[0, :, -1] - read[1, :, -1]).abs().max() > 1e-3
    torch.testing.assert_close(read[0, :, :-1], read[1, :, :-1])


def test_kv_slots_value_scale_and_read_key(tiny_lm_kwargs):
    """The slot hands on s_h x the read (a delta-rule read comes back shrunk), and its key made
    from the read raises the slot's share for a query the read answers and lowers it otherwise."""
    _, model = _model(tiny_lm_kwargs, "cache_replacement:kv_slots", window=4)
    module = next(m for m in model.modules() if hasattr(m, "slot_key"))
    H, d = module.slot_key.shape
    g = torch.Generator().manual_seed(0)
    read = torch.randn(1, H, 3, d, generator=g)
    q = torch.stack([read[:, :, 0], -read[:, :, 0], torch.zeros_like(read[:, :, 0])], dim=2)  # match, anti, none
    read[:, :, 1:] = read[:, :, :1]
    o_local = torch.zeros(1, H, 3, d)
    lse = module.slot_bias.detach().view(1, H, 1).expand(1, H, 3)  # beta = 1/2 with the keys at zero
    with torch.no_grad():
        module.gate_alpha.fill_(10.0)  # open: tanh = 1
        module.slot_scale.fill_(2.0)
        torch.testing.assert_close(module._joint(o_local, lse, read, q), 2.0 * 0.5 * read)
        module.slot_read_key.copy_(torch.eye(d).expand(H, d, d))
        share = module._joint(o_local, lse, read, q)[..., 0] / (2.0 * read[..., 0])  # [1, H, 3]
    assert (share[..., 0] > 0.55).all() and (share[..., 1] < 0.45).all()
    torch.testing.assert_close(share[..., 2], torch.full_like(share[..., 2], 0.5))


def test_memory_slots_is_refused_with_a_clear_error(tiny_lm_kwargs):
    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs, seed=0))
    with pytest.raises(ValueError, match="ttt.memory_slots"):
        install_ttt(base, {"variant": "cache_replacement", "memory_read": "kv_slots", "memory_slots": 3})


@pytest.mark.parametrize("variant", VARIANTS)
def test_opening_parameters_train_faster_without_weight_decay(tiny_lm_kwargs, variant):
    """Gates, read projections and inner-lr projections get optim.opening_lr_scale x the LR and no
    weight decay; the fast-weight memory keeps the base LR and the configured decay."""
    from moshi_ttt.training.module import MoshiTTTModule, OptimConfig

    _, model = _model(tiny_lm_kwargs, variant)
    module = MoshiTTTModule(lambda: model, optim=OptimConfig(lr=1e-3, weight_decay=0.1, opening_lr_scale=20.0))
    module.configure_model()
    groups = module.configure_optimizers()["optimizer"].param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(module.trainable_named_parameters())
    gates = [p for n, p in names.items() if n.endswith("gate_alpha")]
    lr_projs = [p for n, p in names.items() if "lr_proj" in n]
    fast = [p for n, p in names.items() if "memory.initial" in n]
    assert gates and lr_projs and fast
    for p in gates + lr_projs:
        assert by_param[id(p)]["lr"] == pytest.approx(2e-2) and by_param[id(p)]["weight_decay"] == 0.0
    for p in fast:
        assert by_param[id(p)]["lr"] == pytest.approx(1e-3) and by_param[id(p)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(names)


@pytest.mark.parametrize("variant", ["pre_attention", "post_attention", "hybrid"])
def test_init_from_attention_copies_the_attention_and_starts_at_the_frozen_model(tiny_lm_kwargs, variant):
    """ttt.init_from_attention: the TTT branch's projections are the layer's attention's, the gate
    is closed (step 0 is the frozen base with the variant's window), and opening the gate alone
    changes the output (the copied read is live, unlike a zero read projection's)."""
    from moshi_ttt.models.attention import install_local_attention

    base, model = tiny_variant_model(tiny_lm_kwargs, variant, 8, init_from_attention=True)
    layer = model.transformer.layers[0]
    q, k, v = layer.layer.self_attn.in_projs[0].weight.chunk(3)
    for proj, weight in ((layer.ttt.q_proj, q), (layer.ttt.k_proj, k), (layer.ttt.v_proj, v),
                         (layer.ttt.out_proj, layer.layer.self_attn.out_projs[0].weight)):
        assert torch.equal(proj.weight, weight)
    assert not layer.ttt.gate_alpha.any()
    install_local_attention(base, {i: int(getattr(lay, "layer", lay).self_attn.context)
                                   for i, lay in enumerate(model.transformer.layers)})
    codes = _codes(tiny_lm_kwargs)
    with torch.no_grad():
        ref = base(codes).logits.nan_to_num()
        torch.testing.assert_close(model(codes).logits.nan_to_num(), ref, atol=1e-5, rtol=0)
        for lay in model.transformer.layers:
            if hasattr(lay, "ttt"):
                lay.ttt.gate_alpha.fill_(0.5)
        assert (model(codes).logits.nan_to_num() - ref).abs().max() > 1e-3


def test_init_from_attention_needs_the_attentions_heads(tiny_lm_kwargs):
    model = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs=tiny_lm_kwargs))
    with pytest.raises(ValueError, match="ttt.init_from_attention.*num_heads=4"):
        install_ttt(model, {"variant": "pre_attention", "init_from_attention": True,
                            "ttt_layer": {"num_heads": 2}})


@pytest.mark.parametrize("read", ["add", "kv_slots"])
def test_memory_key_adapter_starts_at_identity_and_leaves_attention_alone(tiny_lm_kwargs, read):
    """ttt.memory_key_adapter: from zero the memory reads and writes with the attention's own
    keys (the same outputs as without it); trained, it changes only what the memory stores."""
    _, plain = tiny_variant_model(tiny_lm_kwargs, f"cache_replacement:{read}", 8)
    _, adapted = tiny_variant_model(tiny_lm_kwargs, f"cache_replacement:{read}", 8, memory_key_adapter=True)
    _open_gates(plain)
    missing = adapted.load_state_dict(plain.state_dict(), strict=False).missing_keys  # same values elsewhere
    adapters = [p for n, p in adapted.named_parameters() if n.endswith("key_adapter")]
    assert len(adapters) == 2 and all(p.requires_grad for p in adapters)
    assert sorted(missing) == sorted(n for n, _ in adapted.named_parameters() if n.endswith("key_adapter"))
    codes = _codes(tiny_lm_kwargs)
    with torch.no_grad():
        for p in adapters:
            p.zero_()
        ref = plain(codes).logits.nan_to_num()
        torch.testing.assert_close(adapted(codes).logits.nan_to_num(), ref, atol=1e-5, rtol=0)
        for p in adapters:
            p.normal_(std=0.5)
        assert (adapted(codes).logits.nan_to_num() - ref).abs().max() > 1e-3
        set_ttt_enabled(adapted, False)
        set_ttt_enabled(plain, False)
        torch.testing.assert_close(adapted(codes).logits.nan_to_num(), plain(codes).logits.nan_to_num(),
                                   atol=1e-5, rtol=0)
