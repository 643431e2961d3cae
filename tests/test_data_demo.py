"""The embedded demo dataset and the spoken recall set (espeak-ng, word by word)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

from moshi_ttt.data.alignment import END_OF_TEXT_PADDING_ID, MAIN_SPEAKER, tokenize_word
from moshi_ttt.data.shards import ShardIndex, decode_codes, iter_shard_samples, resolve_shards

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is missing (Debian package: apt-get install espeak-ng; make demo-data installs it)",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from moshi_ttt.data.demo_dataset import build_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    summary = build_demo_dataset(
        out, num_dialogues=3, num_val=1, min_seconds=5.0, max_seconds=7.0, samples_per_shard=1, progress=False
    )
    return out, summary


def read(out_dir):
    return [
        (decode_codes(r["codes.npy"]), json.loads(r["meta.json"]))
        for url in resolve_shards(out_dir)
        for r in iter_shard_samples(url, lambda e: (_ for _ in ()).throw(e))
    ]


@needs_espeak
def test_demo_dataset_layout_audio_and_exact_word_timings(demo):
    out, summary = demo
    assert summary["train"]["samples"] == 2 and summary["val"]["samples"] == 1
    assert summary["train"]["skipped"] == 0 and summary["card"] == 64
    assert json.loads((out / "dataset.json").read_text())["text_card"] == summary["text_card"]
    assert len(ShardIndex.load(out / "shards" / "train").shards) == 2
    lines = (out / "manifest_train.jsonl").read_text().splitlines()
    for line in lines:
        entry = json.loads(line)
        audio, rate = sf.read(out / entry["path"], always_2d=True)
        assert rate == 24_000 and audio.shape[1] == 2
        assert abs(audio.shape[0] / rate - entry["duration"]) < 1e-6 and 5.0 <= entry["duration"] <= 14.0
        words = json.loads((out / entry["path"]).with_suffix(".json").read_text())["alignments"]
        assert {w[2] for w in words} == {MAIN_SPEAKER, "SPEAKER_OTHER"}
        for text, (start, end), speaker in words:
            channel = 0 if speaker == MAIN_SPEAKER else 1
            s0, s1 = round(start * rate), round(end * rate)
            inside = np.abs(audio[s0:s1, channel]).max()
            before = np.abs(audio[max(0, s0 - 480) : s0 - 120, channel]).max()  # 20 ms ending 5 ms before
            assert inside > 0.1 and before < 0.2 * inside, (text, start)


@needs_espeak
def test_demo_shards_carry_the_main_speakers_words(demo):
    out, _ = demo
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.is_unknown(0) and sp.is_control(3)
    for codes, meta in read(out / "shards" / "train"):
        words = json.loads((out / meta["source"]).with_suffix(".json").read_text())["alignments"]
        main = [w for w in words if w[2] == MAIN_SPEAKER]
        assert meta["main_words"] == len(main) and meta["text_tokens_dropped"] == 0
        first, (start, _), _ = main[0]
        frame = int(start * 12.5)
        ids = tokenize_word(sp, first)
        assert (
            codes[0, frame : frame + len(ids)].tolist() == ids
            and codes[0, frame - 1] == END_OF_TEXT_PADDING_ID
        )
        assert codes[1:].max() < 64 and len(np.unique(codes[1])) > 3


@needs_espeak
def test_spoken_recall_spans_hold_the_value(demo, tmp_path):
    from moshi_ttt.data.recall import LongRecallSpec, build_audio_recall_set

    out, _ = demo
    result = build_audio_recall_set(
        tmp_path, out / "tokenizer.model", out / "mimi", num_samples=1, spec=LongRecallSpec(distances=(75,)),
        progress=False,
    )
    assert result.report["samples"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ((codes, meta),) = read(tmp_path / "shards")
    ((fact,),) = [meta["recalls"]]
    (f0, f1), (r0, r1) = fact["fact_span"], fact["recall_span"]
    word = json.loads((tmp_path / "audio" / "recall-00000.json").read_text())["alignments"]
    spoken = next(w for w, (start, _), _ in word if abs(start - fact["fact_seconds"][0]) < 1e-9)
    expected = tokenize_word(sp, fact["value"])  # the value's own tokens, its full stop left out
    assert spoken.rstrip(".") == fact["value"] and len(tokenize_word(sp, spoken)) > len(expected)
    assert codes[0, f0:f1].tolist() == expected and codes[0, r0:r1].tolist() == expected
    assert fact["delay_frames"] == r0 - f1 and abs(fact["delay_frames"] - 75) <= 40
    assert fact["fact_audio_span"][0] == f0 and fact["recall_audio_span"][0] == r0
    assert fact["fact_seconds"][0] * 12.5 < f0 + 1


def test_missing_espeak_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from moshi_ttt.data import demo_dataset, espeak

    monkeypatch.setattr(espeak.shutil, "which", lambda name: None)
    assert demo_dataset.main([str(tmp_path / "demo")]) == 1
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # failed before writing anything
