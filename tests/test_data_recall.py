"""The token-level long-range recall set: spans, delays and cues are what meta.json says they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch.utils.data import DataLoader

from moshi_ttt.data.recall import TokenRecallSpec, delay_frames_for, main, write_token_recall_shards
from moshi_ttt.data.shards import ShardIndex, decode_codes, iter_shard_samples, resolve_shards
from moshi_ttt.data.stream import TokenSequenceDataset


def read(out_dir):
    out = []
    for url in resolve_shards(out_dir):
        for raw in iter_shard_samples(url, lambda exn: (_ for _ in ()).throw(exn)):
            out.append((decode_codes(raw["codes.npy"]), json.loads(raw["meta.json"])))
    return out


def test_delay_beyond_the_attention_window():
    assert delay_frames_for(context_frames=3000, beyond_seconds=10) == 3125
    assert delay_frames_for(delay_seconds=60) == 750
    with pytest.raises(ValueError):
        delay_frames_for(delay_seconds=60, context_frames=3000)
    with pytest.raises(ValueError):
        delay_frames_for()


def test_token_recall_meta_is_consistent(tmp_path):
    spec = TokenRecallSpec(delay_frames=delay_frames_for(context_frames=200, beyond_seconds=4))
    index = write_token_recall_shards(tmp_path, num_samples=12, spec=spec, seed=3, samples_per_shard=5)
    assert len(index.shards) == 3 and index.total_samples == 12
    assert ShardIndex.load(tmp_path).extra["recall"]["delay_frames"] == 250
    samples = read(tmp_path)
    cues = set()
    for codes, meta in samples:
        (f0, f1), (r0, r1) = meta["fact_span"], meta["recall_span"]
        assert codes.shape == (17, meta["frames"]) and meta["frames"] == r1 + spec.tail_frames
        assert f1 - f0 == r1 - r0 == spec.fact_frames
        assert meta["delay_frames"] == r0 - f1 == 250 > 200  # the fact has left a 200-frame window
        np.testing.assert_array_equal(codes[:, f0:f1], codes[:, r0:r1])  # text and all 16 codebooks
        assert codes[0, f0:f1].tolist() == meta["fact_text"]
        assert set(codes[0, f0:f1:2].tolist()).isdisjoint({0, 3})  # fact words are real words
        assert codes[0, f0 - 1] == 0  # end-of-padding just before the fact's first word
        c0, c1 = meta["recall_cue_span"]
        assert c1 == r0 and c1 - c0 == spec.cue_frames
        cues.add((codes[:, slice(*meta["fact_cue_span"])].tobytes(), codes[:, c0:c1].tobytes()))
        assert codes.min() >= 0 and codes[1:].max() < spec.card and codes[0].max() < spec.text_card
    assert len(cues) == 1  # the cues are the same in every sample ...
    assert len({codes[0, slice(*m["fact_span"])].tobytes() for codes, m in samples}) == len(
        samples
    )  # facts differ
    assert len({m["fact_span"][0] for _, m in samples}) > 1  # ... and the fact's position varies


def test_token_recall_set_is_deterministic_and_readable_by_the_training_reader(tmp_path):
    spec = TokenRecallSpec(delay_frames=100)
    write_token_recall_shards(tmp_path / "a", 6, spec, seed=1, samples_per_shard=3)
    write_token_recall_shards(tmp_path / "b", 6, spec, seed=1, samples_per_shard=3)
    for (ca, ma), (cb, mb) in zip(read(tmp_path / "a"), read(tmp_path / "b"), strict=True):
        np.testing.assert_array_equal(ca, cb)
        assert ma == mb
    ds = TokenSequenceDataset(tmp_path / "a", seq_len=64, random_crop=False)
    batch = next(iter(DataLoader(ds, batch_size=2, num_workers=0)))
    assert batch["codes"].shape == (2, 17, 64) and batch["skipped"].sum() == 0


def test_cli_and_bad_layouts(tmp_path, capsys):
    assert (
        main(
            [
                "tokens",
                str(tmp_path / "r"),
                "--num-samples",
                "3",
                "--context-frames",
                "50",
                "--beyond-seconds",
                "2",
            ]
        )
        == 0
    )
    assert "delay 75 frames" in capsys.readouterr().out
    assert all(m["delay_frames"] == 75 for _, m in read(tmp_path / "r"))
    with pytest.raises(ValueError, match="cue"):
        write_token_recall_shards(tmp_path / "x", 1, TokenRecallSpec(delay_frames=2, cue_frames=4))
    with pytest.raises(ValueError, match="text_card"):
        write_token_recall_shards(tmp_path / "x", 1, TokenRecallSpec(delay_frames=20, text_card=4))


def test_same_cue_and_shared_cue_seed(tmp_path):
    """``same_cue``: the recall cue is the fact cue; ``cue_seed``: splits with different seeds share cues."""
    spec = TokenRecallSpec(delay_frames=30, same_cue=True)
    write_token_recall_shards(tmp_path / "a", 3, spec, seed=1, cue_seed=0)
    write_token_recall_shards(tmp_path / "b", 3, spec, seed=2, cue_seed=0)
    cues = set()
    for codes, meta in read(tmp_path / "a") + read(tmp_path / "b"):
        fact_cue, recall_cue = codes[:, slice(*meta["fact_cue_span"])], codes[:, slice(*meta["recall_cue_span"])]
        np.testing.assert_array_equal(fact_cue, recall_cue)
        cues.add(fact_cue.tobytes())
    assert len(cues) == 1
    assert ShardIndex.load(tmp_path / "b").extra["recall"]["cue_seed"] == 0
    write_token_recall_shards(tmp_path / "c", 1, TokenRecallSpec(delay_frames=30), seed=2)
    (codes, meta), = read(tmp_path / "c")
    assert codes[:, slice(*meta["fact_cue_span"])].tobytes() not in cues  # default: distinct cues per seed


def test_pairs_recall_layout_and_scored_frames(tmp_path):
    from moshi_ttt.data.recall import PairsRecallSpec, pairs_recall_sample, write_pairs_recall_shards

    spec = PairsRecallSpec(gaps=(40,), pairs=(4,))
    codes, meta = pairs_recall_sample(np.random.default_rng(0), spec)
    text = codes[0]
    assert codes.shape == (17, spec.frames()) and not codes[1:].any()  # audio: one constant code
    stated = dict(zip(text[1:9:2].tolist(), text[2:9:2].tolist()))
    a, b = meta["recall_span"]
    asked = text[a:b]
    assert sorted(asked[0::2].tolist()) == sorted(stated)  # every key is asked again...
    assert all(stated[k] == v for k, v in zip(asked[0::2].tolist(), asked[1::2].tolist()))  # ...with its value
    assert meta["recall_frames"] == list(range(a + 1, b, 2)) and meta["delay_frames"] == 41
    assert set(text[a + 1 : b : 2].tolist()) <= set(spec.value_ids) and not set(stated) & set(spec.value_ids)
    index = write_pairs_recall_shards(tmp_path, 10, spec, seed=3)
    assert index.total_samples == 10 and len(read(tmp_path)) == 10
    with pytest.raises(ValueError, match="num_keys"):
        PairsRecallSpec(gaps=(4,), num_keys=70).check()


def test_pairs_key_in_audio_puts_each_key_beside_its_value():
    """key_in_audio: the frame of every value (stated or asked) carries its key in the user's
    first codebook, so a single attention hop finds it; the text is the plain layout."""
    from moshi_ttt.data.recall import PairsRecallSpec, pairs_recall_sample

    spec = PairsRecallSpec(gaps=(6,), pairs=(3,), key_in_audio=True)
    codes, meta = pairs_recall_sample(np.random.default_rng(1), spec)
    plain, _ = pairs_recall_sample(np.random.default_rng(1), PairsRecallSpec(gaps=(6,), pairs=(3,)))
    assert (codes[0] == plain[0]).all() and meta["key_in_audio"]
    text, keys = codes[0], codes[spec.key_stream]
    value_frames = [2, 4, 6, *meta["recall_frames"]]
    assert all(keys[f] == text[f - 1] for f in value_frames)  # the key stated just before the value
    assert not np.delete(keys, value_frames).any() and not np.delete(codes[1:], spec.key_stream - 1, 0).any()
    with pytest.raises(ValueError, match="key_stream"):
        PairsRecallSpec(gaps=(4,), key_in_audio=True, key_stream=0).check()
