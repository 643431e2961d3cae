"""Long-context evaluation (moshi_ttt.eval) on constructed cases with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from moshi.models.lm import LMOutput

from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards
from moshi_ttt.eval.generate import _entropy, generate_and_track, track_windows
from moshi_ttt.eval.phases import (
    PHASES,
    classify_window,
    distinct_n,
    longest_loop,
    moving_ttr,
    repetition_rate,
)
from moshi_ttt.eval.position_loss import compare_models, position_losses
from moshi_ttt.eval.recall import late_loss, recall_accuracy, recall_report
from moshi_ttt.eval.samples import iter_samples, load_codes, stack_codes
from moshi_ttt.training.loss import LossConfig, moshi_loss

CARD = 64


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny Moshi of conf/model/tiny.yaml with a 32-frame attention window."""
    from pathlib import Path

    import yaml

    from moshi_ttt.models import build_model

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml").read_text())
    cfg["lm_kwargs"]["context"] = 32
    return build_model(cfg, {"variant": "none"}).eval()


class ScriptedModel(torch.nn.Module):
    """A stand-in LMModel whose predictions are scripted from the codes (teacher-forced)."""

    card = text_card = CARD
    text_padding_token_id, end_of_text_padding_id, audio_offset = 3, 0, 1

    def __init__(self, predict):
        super().__init__()
        self.predict = predict  # codes [B, 17, T] -> (text logits [B, 1, T, C], audio logits [B, 8, T, C])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, codes):
        text, audio = self.predict(codes)
        valid = codes >= 0
        return LMOutput(audio, valid[:, 1:9], text, valid[:, :1])


def one_hot_logits(tokens: torch.Tensor, scale: float = 30.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens.clamp_min(0), CARD).float() * scale


def lag_copy(lag: int) -> ScriptedModel:
    """Predicts every stream's token at frame t as its token at frame t - lag (a causal copy with a
    memory of exactly ``lag`` frames; uniform before that)."""

    def predict(codes):
        shifted = torch.full_like(codes, -1)
        shifted[..., lag:] = codes[..., :-lag]
        logits = one_hot_logits(shifted)
        logits[shifted < 0] = 0.0
        return logits[:, :1], logits[:, 1:9]

    return ScriptedModel(predict)


# ---- loss by position -------------------------------------------------------------------------
def test_position_buckets_on_a_constructed_case():
    """Uniform predictions for the first minute, perfect ones after: the 0-1 min bucket is log(card),
    1-4 min is ~0, the curve steps at frame 750, and padding is left out of the counts."""

    def predict(codes):
        logits = one_hot_logits(codes)
        logits[:, :, :750] = 0.0
        return logits[:, :1], logits[:, 1:9]

    codes = torch.randint(0, CARD, (2, 17, 1000))
    codes[1, :, 900:] = -1
    res = position_losses(ScriptedModel(predict), codes, frames_per_bucket=250, batch_size=1)
    assert [b["bucket"] for b in res["buckets"]] == ["0-1min", "1-4min"]
    first, second = res["buckets"]
    assert (first["start_frame"], first["end_frame"], second["end_frame"]) == (0, 750, 1000)
    assert first["loss"] == pytest.approx(math.log(CARD), abs=1e-4)
    assert first["text_loss"] == pytest.approx(math.log(CARD), abs=1e-4)
    assert second["loss"] < 1e-6
    assert first["tokens"] == 2 * 750 * 9
    assert second["tokens"] == (250 + 150) * 9
    assert [round(c["loss"], 3) for c in res["curve"]] == [round(math.log(CARD), 3)] * 3 + [0.0]
    assert res["sequences"] == 2 and res["frames"] == 1000


def test_held_out_sequences_cut_pad_or_pack(tmp_path):
    from moshi_ttt.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "s", 5, 20, CARD, CARD, samples_per_shard=2)
    convs = [s.codes for s in iter_samples(str(tmp_path / "s"))]
    cut = load_codes(str(tmp_path / "s"), 30, 2)
    assert cut.shape == (2, 17, 30) and (cut[:, :, 20:] == -1).all() and torch.equal(cut[1, :, :20], convs[1])
    packed = load_codes(str(tmp_path / "s"), 30, 3, pack=True)
    # every sequence starts a conversation; the one that overflows it is cut (as training packs)
    assert packed.shape == (3, 17, 30)
    assert torch.equal(packed[0], torch.cat([convs[0], convs[1][:, :10]], dim=1))
    assert torch.equal(packed[1], torch.cat([convs[2], convs[3][:, :10]], dim=1))
    assert torch.equal(packed[2, :, :20], convs[4]) and (packed[2, :, 20:] == -1).all()  # the shards ran out


def test_compare_models_matches_the_training_loss(tiny_model, tmp_path):
    """On a real (tiny) Moshi, the overall loss is moshi_loss's per-token CE; the table has every model."""
    torch.manual_seed(0)
    codes = torch.randint(0, CARD, (2, 17, 80))
    table = compare_models({"a": tiny_model, "b": lag_copy(1)}, codes, frames_per_bucket=20)
    out = tiny_model(codes)
    res = moshi_loss(out, codes, LossConfig(), (3, 0))
    assert table.results["a"]["loss"] == pytest.approx(float(res.token_losses.sum() / res.token_counts.sum()), rel=1e-5)
    assert len(table.results["a"]["curve"]) == 4
    md = table.markdown()
    assert "| a |" in md and "| b |" in md and "0-1min" in md
    rows = list(table.rows())
    assert {r["kind"] for r in rows} == {"overall", "bucket", "curve"}
    table.write_csv(tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().startswith("model,kind,bucket")


# ---- recall --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recall_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    spec = dict(card=CARD, text_card=CARD, fact_frames=8, fact_start_jitter=10, tail_frames=5)
    write_token_recall_shards(root / "d40", 8, TokenRecallSpec(delay_frames=40, **spec), seed=0)
    write_token_recall_shards(root / "d20", 8, TokenRecallSpec(delay_frames=20, **spec), seed=1)
    return root


def test_recall_is_one_for_a_model_that_copies_the_fact(recall_sets):
    """A causal copy whose memory reaches exactly the fact (delay + fact length back) recalls every
    token at that delay, and none at the other beyond chance."""
    r = recall_accuracy(lag_copy(40 + 8), [str(recall_sets / "d40"), str(recall_sets / "d20")], batch_size=3)
    assert set(r) == {"overall", "by_delay", "num_samples", "chance"}
    assert r["num_samples"] == 16
    assert r["by_delay"][40] == 1.0
    assert r["by_delay"][20] < 0.1
    assert r["chance"] == pytest.approx(1 / CARD)
    assert recall_accuracy(lag_copy(20 + 8), str(recall_sets / "d20"))["overall"] == 1.0


def test_recall_of_a_random_model_is_chance(tiny_model, recall_sets):
    rep = recall_report(tiny_model, str(recall_sets / "d40"), max_samples=8)
    assert rep["num_samples"] == 8
    # 8 samples x 8 frames x (4 word tokens + 8 codebooks): text padding is not scored
    assert rep["tokens"] == 8 * 8 * 8 + 8 * 4
    assert abs(rep["overall"] - rep["chance"]) < 0.035
    assert [s["delay_frames"] for s in rep["samples"]] == [40] * 8


def test_recall_rejects_a_set_without_recall_meta(tmp_path):
    from moshi_ttt.data.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "syn", 2, 20, CARD, CARD)
    with pytest.raises(ValueError, match="not a recall set"):
        recall_accuracy(lag_copy(1), str(tmp_path / "syn"))


def test_late_loss_is_the_mean_ce_after_the_start_frame(tiny_model, recall_sets):
    """moshi_loss's per-token CE over frames >= start, the same however the conversations are batched."""
    shards = str(recall_sets / "d20")
    samples = [s.codes for s in iter_samples(shards, 4)]
    codes = stack_codes(samples, max(c.shape[1] for c in samples) + 1)  # every last frame scored
    res = moshi_loss(tiny_model(codes), codes, LossConfig(), (3, 0))
    expected = float(res.token_losses[:, 50:].sum() / res.token_counts[:, 50:].sum())
    for batch_size in (1, 3):
        got = late_loss(tiny_model, shards, 50, max_samples=4, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-5)
    assert math.isnan(late_loss(tiny_model, shards, 10_000, max_samples=2))


# ---- collapse phases -----------------------------------------------------------------------
def words(text: str, vocab: dict) -> list[int]:
    return [vocab.setdefault(w, len(vocab) + 10) for w in text.split()]


def test_token_statistics():
    assert repetition_rate([1, 2, 3, 1, 2, 3], 3) == pytest.approx(1 / 4)
    assert repetition_rate([1, 2], 3) == 0.0
    assert distinct_n([1, 1, 2, 2], 1) == 0.5
    assert distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3)
    assert longest_loop([9, 1, 2, 3, 1, 2, 3, 1, 2, 8]) == (8, 3)
    assert longest_loop([1, 2, 3, 4]) == (0, 0)
    assert moving_ttr(list(range(40)), 20) == 1.0
    assert moving_ttr([1, 2] * 20, 20) == pytest.approx(0.1)


def test_phase_classifier_on_the_lab_notes_examples():
    """The four phases quoted in ../shared/seeds/003, token by token."""
    v: dict = {}
    coherent = words("I'm not too concerned about it yeah I know it's not a big deal I mean I was worried about it", v)
    loop = words("I'm sure it's fine " * 7, v)
    fragments = words("a of is the in b of f in is brain oh f yes a the of here of as", v)
    salad = words("brain society body history finish born music type life heart four ago year thing friend "
                  "against sleep please under aid pressure age", v)
    assert classify_window(coherent, entropy=0.25) == "coherent"
    assert classify_window(loop, entropy=0.1) == "loops"
    assert classify_window(fragments, entropy=0.5) == "fragmentation"
    assert classify_window(salad, entropy=0.95) == "word_salad"
    assert classify_window(coherent[:4], entropy=0.25) == "silent"


def test_phase_classifier_on_constructed_streams():
    rng = np.random.default_rng(0)
    assert classify_window([7] * 30, entropy=0.05) == "loops"  # a constant token
    assert classify_window([5, 6, 7, 8] * 8, entropy=0.2) == "loops"  # a 4-token phrase
    uniform = rng.integers(0, 32000, 30).tolist()
    assert classify_window(uniform, entropy=1.0) == "word_salad"
    # without the model's entropy, varied tokens cannot be told from fluent speech: never salad
    assert classify_window(uniform, entropy=None) == "coherent"
    few = rng.choice([11, 12, 13, 14, 15], 30).tolist()
    assert classify_window(few, entropy=0.5) == "fragmentation"
    zipf = (rng.zipf(1.3, 30) + 100).tolist()
    assert classify_window(zipf, entropy=0.2) in ("coherent", "fragmentation")


def test_track_windows_follows_a_scripted_collapse():
    """A 40 s timeline: coherent -> loops -> fragmentation -> word salad, padding in between."""
    rng = np.random.default_rng(1)
    W = 125
    segments = [(rng.permutation(np.arange(100, 400))[:63], 0.2),
                (np.array([20, 21, 22, 23] * 16), 0.1),
                (rng.choice([30, 31, 32, 33, 34], 63), 0.5),
                (rng.integers(1000, 30000, 63), 0.95)]
    text, ent = [], []
    for tokens, h in segments:
        for t in range(W):  # a word every other frame, padding (3) between, as Moshi's monologue
            text.append(int(tokens[t // 2]) if t % 2 == 0 else 3)
            ent.append(h)
    audio = [[int(x) for x in rng.integers(0, CARD, len(text))] for _ in range(8)]
    windows = track_windows(text, ent, audio, [0.5] * len(text), W, prompt_frames=0, ignore_text=(0, 3))
    assert [w["phase"] for w in windows] == ["coherent", "loops", "fragmentation", "word_salad"]
    assert windows[1]["loop_period"] == 4 and windows[1]["tokens"] == 63
    assert windows[2]["end_s"] == 30.0


# ---- streaming generation ------------------------------------------------------------------
def test_generation_forces_the_prompt_then_runs_free(tiny_model, tmp_path):
    torch.manual_seed(3)
    prompt = torch.randint(0, CARD, (17, 60))
    tl = generate_and_track(tiny_model, prompt, num_frames=90, prompt_frames=40, window_frames=30, seed=0)
    assert len(tl.text_tokens) == 90 and all(len(a) == 90 for a in tl.audio_tokens)
    assert tl.text_tokens[:40] == prompt[0, :40].tolist()
    assert tl.audio_tokens[0][:40] == prompt[1, :40].tolist()  # no delay: forced through frame 39
    assert tl.audio_tokens[1][:39] == prompt[2, :39].tolist()  # delay 1: forced through frame 38
    assert tl.text_tokens[40:60] != prompt[0, 40:60].tolist()  # free-running
    # Teacher-forced, streaming computes what the training forward computes.
    with torch.no_grad():
        out = tiny_model(prompt[None, :, :40])
    expected = (_entropy(out.text_logits[0, 0]) / math.log(CARD)).tolist()
    assert tl.text_entropy[:40] == pytest.approx(expected, abs=1e-4)
    assert all(math.isnan(x) for x in tl.audio_entropy[:39]) and not math.isnan(tl.audio_entropy[45])
    assert [w["start_frame"] for w in tl.windows] == [0, 30, 60]
    assert tl.windows[1]["teacher_forced"] == pytest.approx(1 / 3)
    # A random model predicts near-uniformly: what it says is word salad.
    assert [w["phase"] for w in tl.generated_windows()] == ["word_salad"]
    assert tl.summary()["worst_phase"] == "word_salad"
    tl.write_json(tmp_path / "t.json")
    tl.write_csv(tmp_path / "t.csv")
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["summary"]["phase_counts"]["word_salad"] == 1 and len(data["windows"]) == 3
    # Same seed, same generation.
    again = generate_and_track(tiny_model, prompt, num_frames=90, prompt_frames=40, window_frames=30, seed=0)
    assert again.text_tokens == tl.text_tokens


def test_generation_of_a_stuck_model_is_a_loop(tiny_model):
    """Text logits pinned on one word (a hook on the text head): a confident constant loop."""

    def pin(module, inputs, output):
        output = torch.zeros_like(output)
        output[..., 17] = 20.0
        return output

    handle = tiny_model.text_linear.register_forward_hook(pin)
    try:
        tl = generate_and_track(tiny_model, torch.randint(0, CARD, (17, 20)), num_frames=60, prompt_frames=10,
                                window_frames=25)
    finally:
        handle.remove()
    assert set(tl.text_tokens[10:]) == {17}
    assert [w["phase"] for w in tl.windows] == ["loops"] * 3
    assert tl.windows[-1]["loop_period"] == 1 and tl.windows[-1]["text_entropy"] < 0.01
    assert set(PHASES) >= {w["phase"] for w in tl.windows}


# ---- command line --------------------------------------------------------------------------
def test_cli_rejects_bad_arguments_before_any_compute(tmp_path, capsys):
    from moshi_ttt.eval.__main__ import main

    assert main(["loss", "--model", "nope", "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "NAME=MODEL" in capsys.readouterr().err
    assert main(["recall", "--model", f"x={tmp_path}", "--shards", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_recall_writes_its_table(tiny_lm_kwargs, recall_sets, tmp_path, capsys):
    import yaml

    from moshi_ttt.eval.__main__ import main

    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(yaml.safe_dump({"source": "tiny", "lm_kwargs": {**tiny_lm_kwargs, "context": 32}}))
    out = tmp_path / "eval"
    assert main(["recall", "--model", f"base=base:{model_yaml}", "--shards",
                 str(recall_sets / "d20"), str(recall_sets / "d40"), "--max-samples", "10", "--late-start", "60",
                 "--out", str(out)]) == 0
    assert "| base |" in capsys.readouterr().out
    data = json.loads((out / "recall.json").read_text())
    assert data["base"]["num_samples"] == 10 and set(data["base"]["by_delay"]) == {"20", "40"}
    assert (out / "recall.png").stat().st_size > 0 and (out / "recall.md").exists()


def test_cli_names_shards_whose_tokens_do_not_fit_the_model(tiny_lm_kwargs, recall_sets, tmp_path, capsys):
    """The wrong base for a set (a smaller vocabulary) is one line naming the shards, not an IndexError."""
    import yaml

    from moshi_ttt.eval.__main__ import main

    model_yaml = tmp_path / "small.yaml"
    model_yaml.write_text(yaml.safe_dump({"source": "tiny", "lm_kwargs": {**tiny_lm_kwargs, "text_card": 4,
                                                                          "existing_text_padding_id": 3}}))
    for command in (["recall"], ["loss", "--frames", "40"]):
        assert main([*command, "--model", f"small=base:{model_yaml}", "--shards", str(recall_sets / "d20"),
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "d20" in err and ">= the model's text_card 4" in err, err
