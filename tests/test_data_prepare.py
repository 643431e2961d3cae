"""``moshi_ttt.data.prepare``: both input formats, text placement, every bad input, resume, workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from moshi_ttt.data.alignment import (
    END_OF_TEXT_PADDING_ID,
    MAIN_SPEAKER,
    OTHER_SPEAKER,
    TEXT_PADDING_ID,
    tokenize_word,
)
from moshi_ttt.data.codec import StereoEncoder, load_mimi
from moshi_ttt.data.demo_dataset import train_tokenizer
from moshi_ttt.data.dialogue import corpus
from moshi_ttt.data.prepare import REPORT_NAME, main, prepare
from moshi_ttt.data.shards import ShardIndex, decode_codes, iter_shard_samples, resolve_shards

WORDS = [
    ["hello", [0.5, 0.9], MAIN_SPEAKER],
    ["yes", [1.0, 1.3], OTHER_SPEAKER],
    ["falcon", [1.2, 1.6], MAIN_SPEAKER],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_tokenizer(corpus(0), tmp_path_factory.mktemp("tok") / "tokenizer.model", 320)


def conversation(seconds: float, rate: int = 24_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    moshi = 0.3 * np.sin(2 * np.pi * (180 + 40 * rng.random()) * t) * (np.sin(2 * np.pi * 1.1 * t) > 0)
    user = rng.normal(0, 0.1, t.size) * (np.sin(2 * np.pi * 0.8 * t + 2) > 0)
    return np.stack([moshi, user]).astype(np.float32)


def write_sample(
    path: Path,
    seconds: float = 3.0,
    rate: int = 24_000,
    words=None,
    seed: int = 0,
    audio=None,
    alignments: bool = True,
) -> Path:
    """One moshi-finetune sample: a stereo file and its sibling alignment json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = conversation(seconds, rate, seed) if audio is None else audio
    sf.write(path, audio.T, rate, subtype="FLOAT" if not np.isfinite(audio).all() else "PCM_16")
    if alignments:
        path.with_suffix(".json").write_text(json.dumps({"alignments": WORDS if words is None else words}))
    return path


def write_manifest(path: Path, samples: list[Path], durations: list[float] | None = None) -> Path:
    lines = []
    for i, s in enumerate(samples):
        duration = durations[i] if durations else sf.info(str(s)).duration
        lines.append(json.dumps({"path": os.path.relpath(s, path.parent), "duration": duration}))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_samples(out_dir: Path) -> dict[str, tuple[np.ndarray, dict]]:
    out = {}
    for url in resolve_shards(out_dir):
        for raw in iter_shard_samples(url, lambda exn: (_ for _ in ()).throw(exn)):
            out[raw["__key__"]] = (decode_codes(raw["codes.npy"]), json.loads(raw["meta.json"]))
    return out


def run(inputs, out, tokenizer, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    kw.setdefault("verbose", False)
    return prepare(inputs, out, tokenizer, "tiny", **kw)


def test_manifest_sample_text_and_codes(tmp_path, tokenizer):
    import sentencepiece as spm

    wav = write_sample(tmp_path / "data" / "a.wav", seconds=3.0)
    manifest = write_manifest(tmp_path / "data" / "train.jsonl", [wav])
    result = run([manifest], tmp_path / "out", tokenizer)
    assert result.report["samples"] == 1 and result.report["skipped_total"] == 0
    ((key, (codes, meta)),) = read_samples(tmp_path / "out").items()
    assert key.startswith("a-") and "." not in key
    assert codes.shape == (17, 38)  # ceil(3 s * 24000 / 1920)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    hello, falcon = tokenize_word(sp, "hello"), tokenize_word(sp, "falcon")
    text = codes[0]
    # "hello" starts at 0.5 s = frame 6.25 -> frame 6; "falcon" at 1.2 s = frame 15; "yes" is the user's.
    assert text[6 : 6 + len(hello)].tolist() == hello and text[5] == END_OF_TEXT_PADDING_ID
    assert text[15 : 15 + len(falcon)].tolist() == falcon and text[14] == END_OF_TEXT_PADDING_ID
    others = np.ones(38, bool)
    others[[5, 14, *range(6, 6 + len(hello)), *range(15, 15 + len(falcon))]] = False
    assert (text[others] == TEXT_PADDING_ID).all()
    audio, _ = sf.read(wav, dtype="float32", always_2d=True)
    expected = StereoEncoder(load_mimi("tiny", device="cpu")).encode([audio.T.copy()])[0]
    np.testing.assert_array_equal(codes[1:], expected)
    assert meta["source"] == "a.wav" and meta["frames"] == 38 and meta["main_words"] == 2
    assert meta["text_tokens_dropped"] == 0
    index = ShardIndex.load(tmp_path / "out")
    assert index.total_samples == 1 and index.total_frames == 38
    assert abs(index.to_json()["total_hours"] - 38 / 12.5 / 3600) < 1e-12
    assert index.extra["prepare"]["settings"]["main_speaker"] == MAIN_SPEAKER
    assert index.extra["prepare"]["model_must_match"] == {
        "card": 64,
        "text_card_at_least": sp.get_piece_size(),
        "existing_text_padding_id": 3,
        "existing_text_end_padding_id": 0,
    }


def test_directory_of_wav_and_flac(tmp_path, tokenizer):
    write_sample(tmp_path / "corpus" / "x" / "one.wav", 2.0, seed=1)
    write_sample(tmp_path / "corpus" / "two.flac", 2.5, seed=2)
    result = run([tmp_path / "corpus"], tmp_path / "out", tokenizer)
    samples = read_samples(tmp_path / "out")
    assert sorted(m["source"] for _, m in samples.values()) == ["two.flac", "x/one.wav"]
    assert sorted(c.shape[1] for c, _ in samples.values()) == [25, 32]
    assert result.report["audio_hours"] == round(4.5 / 3600, 4)


def test_every_bad_input_is_skipped_counted_and_reported(tmp_path, tokenizer, capsys):
    d = tmp_path / "data"
    good = write_sample(d / "good.wav")
    resampled = write_sample(d / "resampled.wav", rate=16_000)
    mono = d / "mono.wav"
    sf.write(mono, conversation(2.0)[0], 24_000)
    mono.with_suffix(".json").write_text(json.dumps({"alignments": WORDS}))
    corrupt = d / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + os.urandom(200))
    nan_audio = conversation(3.0)
    nan_audio[0, 500] = np.nan
    nan = write_sample(d / "nan.wav", audio=nan_audio)
    short = write_sample(d / "short.wav", seconds=0.4, words=[])
    empty = write_sample(d / "empty.wav", words=[])
    no_json = write_sample(d / "no_json.wav", alignments=False)
    out_of_range = write_sample(d / "late.wav", words=[["hi", [0.5, 9.0], MAIN_SPEAKER]])
    inverted = write_sample(d / "inverted.wav", words=[["hi", [2.0, 1.0], MAIN_SPEAKER]])
    truncated = write_sample(d / "truncated.wav")
    files = [good, resampled, mono, corrupt, nan, short, empty, no_json, out_of_range, inverted, truncated]
    durations = [sf.info(str(f)).duration if f != corrupt else 3.0 for f in files]
    durations[-1] = 30.0  # the manifest promises more audio than the file has
    manifest = write_manifest(d / "m.jsonl", files, durations)
    with manifest.open("a") as f:
        f.write('{"duration": 3.0}\nnot json\n{"path": "good.wav", "duration": 3.0}\n')
    result = main(
        [
            str(manifest),
            "--out",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tokenizer),
            "--device",
            "cpu",
            "--no-progress",
            "--samples-per-shard",
            "4",
        ]
    )
    assert result == 0
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["skipped_by_reason"] == {
        "alignment_out_of_range": 1,
        "alignment_start_after_end": 1,
        "duplicate_input": 1,
        "duration_mismatch": 1,
        "empty_conversation": 1,
        "invalid_manifest_entry": 2,
        "missing_alignment": 1,
        "mono_audio": 1,
        "nonfinite_samples": 1,
        "too_short": 1,
        "unreadable_audio": 1,
    }
    assert report["samples"] == 2 and report["notes"]["resampled"] == 1
    assert report["inputs"] == 14 and report["skipped_total"] == 12
    by_path = {s["path"]: s for s in report["skipped"]}
    assert by_path["mono.wav"]["reason"] == "mono_audio" and "mono" in by_path["mono.wav"]["detail"]
    assert {c.shape[1] for c, _ in read_samples(tmp_path / "out").values()} == {
        38
    }  # 16 kHz resampled to 24 kHz
    printed = capsys.readouterr().out
    assert "skipped 12 input(s):" in printed and "mono_audio: 1" in printed and REPORT_NAME in printed


def test_nothing_usable_is_a_nonzero_exit_not_a_crash(tmp_path, tokenizer):
    bad = write_sample(tmp_path / "d" / "bad.wav", words=[["hi", [5.0, 9.0], MAIN_SPEAKER]])
    code = main(
        [
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "out"),
            "--tokenizer",
            str(tokenizer),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 2 and bad.exists()
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["skipped_by_reason"] == {
        "alignment_out_of_range": 1
    }


def test_missing_input_fails_before_any_compute(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        run([tmp_path / "nope.jsonl"], tmp_path / "out", tokenizer)
    assert not (tmp_path / "out").exists()


def _corpus(tmp_path: Path, n: int = 5) -> Path:
    for i in range(n):
        write_sample(tmp_path / "corpus" / f"c{i}.wav", seconds=1.5 + 0.25 * i, seed=i)
    write_sample(tmp_path / "corpus" / "bad.wav", words=[["x", [3.0, 1.0], MAIN_SPEAKER]])
    return tmp_path / "corpus"


def test_resume_skips_finished_shards_and_redoes_broken_ones(tmp_path, tokenizer):
    corpus_dir, out = _corpus(tmp_path), tmp_path / "out"
    first = run([corpus_dir], out, tokenizer, samples_per_shard=2)
    assert first.report["shards"] == {"planned": 3, "reused": 0, "written": 3, "non_empty": 3}
    index_bytes = (out / "index.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    samples = read_samples(out)

    second = run([corpus_dir], out, tokenizer, samples_per_shard=2)
    assert second.report["shards"]["reused"] == 3 and second.report["shards"]["written"] == 0
    assert (out / "index.json").read_bytes() == index_bytes
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert second.report["skipped_by_reason"] == {"alignment_start_after_end": 1}  # remembered, not re-read

    victim = sorted(mtimes)[1]
    (out / victim).write_bytes((out / victim).read_bytes()[:700])  # a shard damaged after the fact
    third = run([corpus_dir], out, tokenizer, samples_per_shard=2)
    assert third.report["shards"]["reused"] == 2 and third.report["shards"]["written"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != victim} == {
        k: v for k, v in mtimes.items() if k != victim
    }
    again = read_samples(out)
    assert again.keys() == samples.keys()
    for key in samples:
        np.testing.assert_array_equal(again[key][0], samples[key][0])
    assert not (out / ".staging").exists()


def test_resume_redoes_a_shard_whose_inputs_changed_and_refuses_other_settings(tmp_path, tokenizer):
    corpus_dir, out = _corpus(tmp_path, 4), tmp_path / "out"
    run([corpus_dir], out, tokenizer, samples_per_shard=2)
    write_sample(corpus_dir / "c3.wav", seconds=2.5, seed=9)  # c3 lives in the last shard
    result = run([corpus_dir], out, tokenizer, samples_per_shard=2)
    assert result.report["shards"]["reused"] == 2 and result.report["shards"]["written"] == 1
    assert any(m["source"] == "c3.wav" and c.shape[1] == 32 for c, m in read_samples(out).values())
    with pytest.raises(ValueError, match="main_speaker"):
        run([corpus_dir], out, tokenizer, samples_per_shard=2, main_speaker="A")
    overwritten = run([corpus_dir], out, tokenizer, samples_per_shard=3, resume=False)
    assert overwritten.report["shards"]["written"] == 2 and len(list(out.glob("*.tar"))) == 2


@pytest.mark.slow
def test_two_workers_write_the_same_shards_as_one(tmp_path, tokenizer):
    corpus_dir = _corpus(tmp_path, 4)
    one = run([corpus_dir], tmp_path / "one", tokenizer, samples_per_shard=2)
    two = run([corpus_dir], tmp_path / "two", tokenizer, samples_per_shard=2, num_workers=2)
    assert two.report["shards"]["written"] == 3
    assert [s.name for s in one.index.shards] == [s.name for s in two.index.shards]
    a, b = read_samples(tmp_path / "one"), read_samples(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        assert a[key][1] == b[key][1]


def test_a_conversation_the_codec_cannot_encode_costs_only_itself():
    from types import SimpleNamespace

    from moshi_ttt.data.prepare import Skip, _encode_batch

    class Flaky:
        def encode(self, audios):
            if any(a.shape[1] == 13 for a in audios):
                raise RuntimeError("CUDA out of memory")
            return [a[:, :1].astype(np.int16) for a in audios]

    items = [
        (SimpleNamespace(source=f"{n}.wav"), SimpleNamespace(samples=np.zeros((2, n)))) for n in (5, 13, 7)
    ]
    skips: list[Skip] = []
    out = _encode_batch(Flaky(), items, skips)
    assert [o is None for o in out] == [False, True, False]
    assert skips == [Skip("13.wav", "encode_error", "RuntimeError: CUDA out of memory")]


def test_a_manifest_line_with_a_non_utf8_byte_costs_only_that_line(tmp_path):
    from moshi_ttt.data.prepare import discover

    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"path": "a.wav", "duration": 3.0}\n'
                         b'{"path": "b\xff.wav", "duration": 3.0}\n'
                         b'{"path": "c.wav", "duration": 3.0}\n')
    conversations, skips = discover([manifest])
    assert sorted(Path(c.audio).name for c in conversations) == ["a.wav", "c.wav"]
    assert [(s.path, s.reason) for s in skips] == [(f"{manifest}:2", "invalid_manifest_entry")]
    assert "UnicodeDecodeError" in skips[0].detail
