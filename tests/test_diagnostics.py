"""Diagnostics (moshi_ttt.diagnostics, python -m moshi_ttt.diagnose) on constructed cases with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from moshi_ttt.diagnostics import (
    DiagnoseSettings,
    check_context,
    check_drift,
    check_predictions,
    check_rope,
    check_ttt_health,
    check_ttt_usage,
    iter_chunks,
    model_layout,
    record_stream,
    run_diagnostics,
    write_report,
)
from moshi_ttt.diagnostics.cli import main as diagnose_main
from moshi_ttt.diagnostics.rope import rope_wavelengths
from moshi_ttt.diagnostics.sources import synthetic_codes
from moshi_ttt.diagnostics.stream import StreamRecord, delayed_input, without_padding

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
WINDOW = 32  # the tiny model's attention context in these tests


def model_cfg(**lm) -> dict:
    cfg = yaml.safe_load((REPO / "conf" / "model" / "tiny.yaml").read_text())
    cfg["lm_kwargs"].update({"context": WINDOW, **lm})
    return cfg


def ttt_cfg(variant: str, **layer) -> dict:
    return {"variant": variant, "layer_indices": [1], "ttt_layer_attention_window": 16, "ttt_layer": dict(layer)}


def tiny(variant: str = "none", trained: bool = True, gate: float | None = None, ttt_extra: dict | None = None,
         **layer):
    """The tiny Moshi with TTT in layer 1; ``trained``: a random (non-zero) output projection, as
    after training; ``gate``: every gate logit set to this value."""
    from moshi_ttt.models import build_model

    cfg = ttt_cfg(variant, **layer) if variant != "none" else {"variant": "none"}
    model = build_model(model_cfg(), {**cfg, **(ttt_extra or {})}).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if trained and name.endswith(("out_proj.weight", "read_proj.weight")):
                p.normal_(std=0.2)
            if gate is not None and name.endswith("gate_alpha"):
                p.fill_(gate)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def codes():
    class _Vocab:
        card = text_card = 64
        text_padding_token_id = 3

    return synthetic_codes(_Vocab, 160, num_samples=2, seed=0)


# ---- RoPE -------------------------------------------------------------------------------------

def test_rope_wavelengths_and_windowed_reach():
    wl = rope_wavelengths(16, 10_000)
    assert wl[0] == pytest.approx(2 * math.pi) and wl[-1] == pytest.approx(2 * math.pi * 10_000 ** (14 / 16))
    res = check_rope(model_layout(tiny()), frames=22_500)  # 30 min through a 32-frame window
    m = res.metrics
    assert m["max_absolute_position"] == 22_499 and m["positions_exact_fp32"]
    assert m["max_relative_distance"] == WINDOW - 1 and m["trained_context"] == WINDOW
    assert m["share_wavelength_gt_max_distance"] == pytest.approx(6 / 8)  # 62.8, 199, ... > 31 frames
    assert m["share_unseen_angles"] == 0 and not res.flagged()


def test_rope_beyond_trained_context_aliasing_and_fp32():
    model = tiny(ttt_extra={"attention_window": 100})  # wider than the trained 32 frames
    res = check_rope(model_layout(model), frames=300)
    assert res.metrics["layers"]["layer0"]["max_relative_distance"] == 99
    assert res.metrics["share_unseen_angles"] == pytest.approx(6 / 8)  # wavelengths > 32 frames: 6 of 8
    assert res.mentions("layer0: relative distances up to 99 frames") and res.mentions("never seen in training")
    assert not res.mentions("alias")
    small = tiny(ttt_extra={"attention_window": 100, "rope_max_period": 10})  # longest wavelength 47 frames
    assert check_rope(model_layout(small), frames=300).mentions("alias")
    assert check_rope(model_layout(tiny()), frames=2**24 + 2).mentions("fp32")
    # an explicit trained context overrides the configured one
    assert not check_rope(model_layout(model), frames=300, trained_context=200).flagged()
    # position interpolation by 4 brings the 99-frame reach back to 24.75 trained positions
    scaled = check_rope(model_layout(tiny(ttt_extra={"attention_window": 100, "rope_position_scale": 4})),
                        frames=300)
    assert scaled.metrics["position_scale"] == 4 and scaled.metrics["layers"]["layer0"]["max_relative_distance"] == 24.75
    assert not scaled.mentions("never seen in training")


# ---- attention context / KV cache -------------------------------------------------------------

def test_window_smaller_than_sequence_warns_wraparound():
    layout = model_layout(tiny())
    res = check_context(layout, frames=300)
    row = res.metrics["layers"]["layer0"]
    assert (row["window"], row["wraps"], row["first_forgotten_frame"], row["frames_out_of_window_at_end"]) == (
        WINDOW, 9, WINDOW, 300 - WINDOW)
    assert row["kv_cache_mib"] == pytest.approx(2 * 4 * WINDOW * 16 * 4 / 2**20)
    assert [f.layer for f in res.flagged()] == ["layer0", "layer1", "model"]
    assert res.mentions("wraparound") and res.mentions("frames older than 32 are dropped from frame 32")
    assert not check_context(layout, frames=WINDOW).flagged()  # fits exactly: no wraparound
    assert check_context(layout, frames=WINDOW + 1).metrics["layers"]["layer1"]["wraps"] == 1


def test_cache_replacement_layer_keeps_old_frames_in_memory():
    res = check_context(model_layout(tiny("cache_replacement")), frames=300)
    assert res.metrics["layers"]["layer1"]["window"] == 17  # per-token writes: the memory takes frames from t - 17
    sun = check_context(model_layout(tiny("cache_replacement", rule="minibatch_gd", mini_batch_size=8)), frames=300)
    assert sun.metrics["layers"]["layer1"]["window"] == 24  # (ceil(16 / 8) + 1) * 8
    assert [f.layer for f in res.flagged()] == ["layer0"]
    ok = [f.message for f in res.findings if f.layer == "layer1"]
    assert ok and "TTT memory (not lost)" in ok[0]
    assert res.metrics["layers_with_memory"] == ["layer1"]


# ---- TTT usage --------------------------------------------------------------------------------

def test_zero_gates_flag_ttt_unused(codes):
    res = check_ttt_usage(tiny("pre_attention", gate=0.0), codes[..., :48], chunk_frames=8)
    assert res.mentions("layer1: TTT unused: gate", "fail")
    assert res.metrics["output"]["rel_hidden_diff"] == 0.0 and res.mentions("model: TTT unused", "fail")
    used = check_ttt_usage(tiny("pre_attention", gate=1.0), codes[..., :48], chunk_frames=8)
    assert not used.flagged() and used.metrics["output"]["rel_hidden_diff"] > 1e-3
    assert used.metrics["output"]["text_kl_mean"] > 0
    untrained = check_ttt_usage(tiny("cache_replacement", trained=False))  # projection still at zero
    assert untrained.mentions("output projection is all zeros", "fail")
    assert check_ttt_usage(tiny()).findings[0].message.startswith("no TTT layers")


# ---- streaming pass -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["none", "pre_attention", "cache_replacement"])
def test_chunked_streaming_equals_the_full_forward(variant, codes):
    model = tiny(variant)
    x = codes[..., :100]
    with torch.no_grad():
        _, full = model.forward_text(delayed_input(model, x)[:, :, :-1])
    for chunk in (1, 7, 40):
        text = torch.cat([c.text_logits for c in iter_chunks(model, x, chunk, audio=False)], dim=1)
        torch.testing.assert_close(text, full[:, 0], atol=2e-5, rtol=1e-4)


def test_record_stream_positions_and_ttt_samples(codes):
    model = tiny("pre_attention")
    x = codes.clone()
    x[1, :, 120:] = -1  # the second sequence is shorter: padded frames are masked out
    rec = record_stream(model, x)  # a delta-rule memory streams in chunks of any size: 16 by default
    assert rec.chunk_frames == 16 and rec.ttt_chunks["layer1"]["end_frame"][:3] == [16, 32, 48]
    assert len(rec.ttt_chunks["layer1"]["fast_weight_norm"]) == 10
    sun = tiny("pre_attention", rule="minibatch_gd", mini_batch_size=8)  # one health sample per mini-batch
    assert record_stream(sun, x[..., :24]).ttt_chunks["layer1"]["end_frame"] == [8, 16, 24]
    assert rec.valid[1, 119] and not rec.valid[1, 120]
    text = rec.mean(rec.text_entropy)
    assert np.isfinite(text).all() and ((text > 0) & (text <= 1)).all()
    audio = rec.mean(rec.audio_entropy)
    assert np.isfinite(audio[1:]).all() and (audio[1:] <= 1).all()
    assert set(rec.residual_rms) == {"layer0", "layer1"}
    assert {"layer0.norm1", "layer1.norm2", "out_norm"} <= set(rec.norm_inputs)
    residual = rec.residual_rms["layer1"]
    assert np.isfinite(residual).all() and rec.mean(residual)[130] == residual[0, 130]  # padding masked out
    assert rec.mean(residual)[100] == pytest.approx(residual[:, 100].mean())


def test_padding_is_never_streamed_nor_a_finding(codes):
    """A conversation shorter than --frames is padded with -1: the padding must not read as a
    non-finite norm input or a NaN entropy (it did, as 'FAIL norm input becomes non-finite')."""
    model = tiny("pre_attention")
    settings = DiagnoseSettings(frames=160, window_frames=32, checks=("ttt_health", "drift", "predictions"))
    real = codes[:1, :, :96]
    padded = torch.cat([real, torch.full((1, 17, 64), -1, dtype=real.dtype)], dim=2)
    got = run_diagnostics(model, padded, settings)
    assert got["settings"]["stream_frames"] == 96 and got["settings"]["padding_frames_not_streamed"] == 64
    assert got["findings"] == run_diagnostics(model, real, settings)["findings"]  # as if no padding existed
    assert not got["summary"]["flagged"] or all("non-finite" not in m for m in got["summary"]["flagged"])
    assert math.isfinite(got["checks"]["predictions"]["metrics"]["text_entropy_last"])
    # two sequences, the second one shorter: the stream stops where it ends
    two = codes[..., :128].clone()
    two[1, :, 96:] = -1
    got = run_diagnostics(model, two, settings)
    assert got["settings"]["stream_frames"] == 96 and got["settings"]["padding_frames_not_streamed"] == 32
    assert got["findings"] == run_diagnostics(model, codes[..., :96], settings)["findings"]
    with pytest.raises(ValueError, match="starts with padding"):
        without_padding(torch.full((1, 17, 8), -1))


def test_stream_mean_leaves_padding_out_and_keeps_real_non_finite_values():
    empty = np.zeros((2, 3))
    rec = StreamRecord(frames=3, chunk_frames=1, valid=np.array([[True, True, False], [True, False, True]]),
                       text_entropy=empty, audio_entropy=empty, text_argmax=empty, audio_argmax=empty)
    mean = rec.mean(np.array([[1.0, np.inf, 5.0], [3.0, 7.0, 9.0]]))
    assert mean.tolist() == [2.0, np.inf, 9.0]  # frame 1: the valid sample diverged, the padded one is ignored
    rec.valid[:, 2] = False
    assert np.isnan(rec.mean(np.ones((2, 3)))[2])  # no sample holds frame 2


def test_one_frame_rate():
    from moshi.models import loaders

    from moshi_ttt.constants import FRAME_RATE

    assert FRAME_RATE == loaders.FRAME_RATE


# ---- TTT state health -----------------------------------------------------------------------------

def test_injected_divergence_is_flagged(codes):
    healthy = record_stream(tiny("pre_attention"), codes)
    res = check_ttt_health(healthy.ttt_chunks, healthy.ttt_initial, healthy.ttt_info)
    assert not res.flagged() and res.metrics["layers"]["layer1"]["max_norm_rel"] < 1
    assert 0 < res.metrics["layers"]["layer1"]["eta_mean"] < 1
    huge_lr = record_stream(tiny("pre_attention", base_lr=1e4, eta_max=1e4), codes)
    res = check_ttt_health(huge_lr.ttt_chunks, huge_lr.ttt_initial, huge_lr.ttt_info)
    assert res.mentions("layer1: fast weights diverged", "fail")
    assert res.metrics["layers"]["layer1"]["first_nonfinite_frame"] == 16  # the delta rule overflows in a chunk
    sun = tiny("pre_attention", rule="minibatch_gd", mini_batch_size=8, base_lr=1e4, eta_max=1e4)
    huge_lr = record_stream(sun, codes)
    res = check_ttt_health(huge_lr.ttt_chunks, huge_lr.ttt_initial, huge_lr.ttt_info)
    assert res.mentions("layer1: fast weights diverged", "fail")
    assert res.metrics["layers"]["layer1"]["max_norm_rel"] > 100


def test_health_rules_on_constructed_series():
    frames = list(range(8, 8 * 41, 8))
    info = {"x": {"norm_scale": 4.0, "eta_max_config": 1.0}}
    init = {"x": {"fast_weight_norm": 0.3}}

    def row(norm, eta_max=0.05):
        n = len(frames)
        return {"x": {"end_frame": frames, "fast_weight_norm": norm, "fast_weight_mean": [0.0] * n,
                      "fast_weight_std": [0.1] * n, "eta_mean": [0.03] * n, "eta_min": [0.01] * n,
                      "eta_max": [eta_max] * n}}

    flat = [1.0 + 0.001 * i for i in range(40)]
    assert not check_ttt_health(row(flat), init, info).flagged()
    nonfinite = flat[:30] + [float("inf")] + [float("nan")] * 9
    res = check_ttt_health(row(nonfinite), init, info)
    assert res.mentions("non-finite from the chunk ending at frame 248", "fail")
    growing = [1.0 * 1.05**i for i in range(40)]  # x2.65 over the second half, still < 10x the scale
    res = check_ttt_health(row(growing), init, info)
    assert res.mentions("still growing", "warn") and not res.flagged("fail")
    assert check_ttt_health(row(flat, eta_max=1.0), init, info).mentions("clamped at ttt.eta_max=1")
    assert check_ttt_health({}, {}, {}).findings[0].message.startswith("no TTT layers")


# ---- drift and jumps -------------------------------------------------------------------------------

def test_residual_jump_at_the_window_and_norm_drift():
    rng = np.random.default_rng(0)
    T = 300
    flat = 1.0 + 0.01 * rng.standard_normal(T)
    jump = flat.copy()
    jump[64:] *= 3.0  # the residual RMS triples where a 64-frame ring cache starts dropping frames
    drifting = np.linspace(1.0, 4.0, T)
    norms = {"layer0.norm1": {"rms": flat, "mean": 0.01 * flat, "std": flat},
             "layer1.norm1": {"rms": drifting, "mean": np.zeros(T), "std": drifting}}
    res = check_drift({"layer0": flat, "layer1": jump}, norms, {"layer0": 64, "layer1": 64}, window_frames=50)
    assert res.metrics["residual"]["layer1"]["max_jump_frame"] == 64
    assert res.metrics["residual"]["layer1"]["max_jump_ratio"] == pytest.approx(3.0, rel=0.05)
    assert res.mentions("layer1: residual RMS jumps") and res.mentions("wraparound")
    assert not any(f.layer == "layer0" for f in res.flagged())
    assert res.mentions("layer1.norm1: norm input drifts") and not res.mentions("layer0.norm1")
    assert res.metrics["norm_inputs"]["layer1.norm1"]["rms_ratio"] == pytest.approx(
        np.mean(drifting[-50:]) / np.mean(drifting[:50]))
    quiet = check_drift({"layer0": flat}, {"layer0.norm1": norms["layer0.norm1"]}, window_frames=50)
    assert not quiet.flagged() and quiet.findings[0].severity == "ok"
    offset = {"n": {"rms": flat, "mean": np.full(T, 6.0), "std": flat}}
    assert check_drift({}, offset).mentions("mean reaches 6")


# ---- predictions --------------------------------------------------------------------------------

def test_entropy_rise_and_loops_are_flagged():
    T, W = 500, 100
    text_entropy = np.concatenate([np.full(300, 0.3), np.full(200, 0.9)])  # word salad from frame 300
    audio_entropy = np.full(T, 0.5)
    rng = np.random.default_rng(0)
    varied = rng.integers(10, 60, size=T)
    looping = varied.copy()
    looping[200:] = np.tile([11, 12, 13, 14], 75)  # a 4-token loop from frame 200
    res = check_predictions(text_entropy, audio_entropy, looping, varied, window_frames=W, ignore_text=(3, 0))
    assert res.mentions("text predictions near-uniform") and res.mentions("from frame 300")
    assert res.mentions("predicted text repeats itself (loops)") and res.mentions("from frame 200")
    assert not res.mentions("audio")
    rows = res.series["windows"]
    assert len(rows) == 5 and rows[3]["repetition_rate"] > 0.9 and rows[0]["distinct_1"] > 0.3
    calm = check_predictions(np.full(T, 0.3), audio_entropy, varied, varied, window_frames=W)
    assert not calm.flagged() and calm.findings[0].severity == "ok"
    padded = varied.copy()
    padded[::2] = 3  # padding ids do not count as content tokens
    rows = check_predictions(np.full(T, 0.3), audio_entropy, padded, varied, window_frames=W,
                             ignore_text=(3,)).series["windows"]
    assert rows[0]["content_tokens"] == 50


# ---- runner, report files, CLI --------------------------------------------------------------------

def write_export(directory: Path, variant: str, **layer) -> Path:
    """An export directory (as ``python -m moshi_ttt.export`` writes) of a 'trained' tiny TTT model."""
    from safetensors.torch import save_file

    from moshi_ttt.models import build_model

    cfg = ttt_cfg(variant, **layer)
    model = build_model(model_cfg(), cfg)
    torch.manual_seed(2)
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            state[name] = (torch.randn_like(p) * 0.2 if name.endswith("out_proj.weight") else p.detach()).contiguous()
    directory.mkdir(parents=True)
    save_file(state, str(directory / "ttt_weights.safetensors"))
    resolved = {**cfg, "ttt_layer": {"rule": "delta", **cfg["ttt_layer"]}}  # as export writes it: the rule named
    (directory / "config.json").write_text(json.dumps({"model": model_cfg(), "ttt": resolved}))
    return directory


def test_run_and_write_report(tmp_path, codes):
    report = run_diagnostics(tiny("pre_attention"), codes[..., :120], DiagnoseSettings(frames=300, window_frames=40),
                             name="pre")
    assert report["schema"] == "moshi_ttt.diagnose/1" and report["settings"]["chunk_frames"] == 16
    assert list(report["checks"]) == ["rope", "context", "ttt_usage", "ttt_health", "drift", "predictions"]
    assert report["settings"]["stream_frames"] == 120 and report["settings"]["frames"] == 300
    assert report["summary"]["status"] == "warn" and report["findings"][0]["severity"] == "warn"
    written = write_report(report, tmp_path / "pre")
    assert {p.name for p in (tmp_path / "pre").iterdir()} == {
        "report.json", "report.md", "rope.png", "context.png", "ttt_usage.png", "ttt_health.png", "drift.png",
        "predictions.png"}
    loaded = json.loads(written["json"].read_text())
    assert loaded["plots"]["ttt_health"] == "ttt_health.png"
    assert len(loaded["checks"]["predictions"]["series"]["windows"]) == 3
    md = written["md"].read_text()
    assert "| **warn** | context | layer0 |" in md and "![ttt_health](ttt_health.png)" in md
    static = run_diagnostics(tiny(), None, DiagnoseSettings(frames=300, checks=("rope", "context")))
    assert list(static["checks"]) == ["rope", "context"] and static["settings"]["stream_frames"] is None


def test_cli_end_to_end_with_divergence_and_wandb(tmp_path, capsys, monkeypatch):
    from moshi_ttt.training.wandb_offline import find_offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    healthy = write_export(tmp_path / "healthy", "pre_attention")
    diverging = write_export(tmp_path / "diverging", "pre_attention", base_lr=1e4, eta_max=1e4)
    base_yaml = tmp_path / "base.yaml"
    base_yaml.write_text(yaml.safe_dump(model_cfg()))
    out = tmp_path / "diag"
    rc = diagnose_main(["--model", f"base=base:{base_yaml}", "--model", f"healthy={healthy}", "--model",
                        f"diverging={diverging}", "--synthetic", "--frames", "96", "--window-frames", "32",
                        "--checks", "context,ttt_usage,ttt_health", "--out", str(out)])
    assert rc == 0
    reports = {n: json.loads((out / n / "report.json").read_text()) for n in ("base", "healthy", "diverging")}
    assert reports["base"]["checks"]["context"]["metrics"]["layers"]["layer0"]["wraps"] == 2
    assert reports["healthy"]["checks"]["ttt_health"]["worst"] == "ok"
    assert reports["healthy"]["checks"]["ttt_usage"]["worst"] == "ok"
    assert reports["diverging"]["checks"]["ttt_health"]["worst"] == "fail"
    printed = capsys.readouterr().out
    assert "diverging: fail" in printed and "fast weights diverged" in printed
    assert diagnose_main(["--model", f"healthy={healthy}", "--synthetic", "--frames", "48", "--checks",
                          "rope,ttt_usage", "--out", str(tmp_path / "wb"), "--wandb"]) == 0
    run = read_offline_run(find_offline_runs(tmp_path / "wb")[0])
    assert run["run_id"] == "diagnose-healthy" and run["config"]["frames"] == 48
    assert run["summary"]["diagnostics/status"] == "ok"
    assert run["summary"]["diagnostics/rope/metrics/max_relative_distance"] == WINDOW - 1


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--frames", "0"], "--frames=0"),
    (["--synthetic", "--frames", "10", "--minutes", "1"], "not both"),
    ([], "give a sequence source"),
    (["--shards", "NOWHERE/shards"], "NOWHERE/shards"),
    (["--synthetic", "--checks", "rope,bogus"], "bogus"),
    (["--synthetic", "--threshold", "jump_ratio=x"], "jump_ratio=x"),
    (["--synthetic", "--chunk-frames", "0"], "--chunk-frames=0"),
])
def test_cli_bad_input_is_named_before_compute(tmp_path, capsys, args, message):
    base_yaml = tmp_path / "base.yaml"
    base_yaml.write_text(yaml.safe_dump(model_cfg()))
    assert diagnose_main(["--model", f"m=base:{base_yaml}", *args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert diagnose_main(["--model", f"m=base:{tmp_path / 'missing.yaml'}", "--synthetic"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
