"""Long spoken conversations that ask for memory (``python -m moshi_ttt.data.recall audio``): facts
stated by the user, recalled by Moshi at chosen distances, small talk between, any TTS; prepared by the
ordinary path, scored by the ordinary recall evaluation."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from moshi_ttt.data.recall import LongRecallSpec, build_audio_recall_set, main
from moshi_ttt.data.shards import decode_codes, iter_shard_samples, resolve_shards
from serve_model import make_dataset_dir

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is missing (apt-get install espeak-ng; make demo-data installs it)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return make_dataset_dir(tmp_path_factory.mktemp("codec"))


def read(out_dir):
    return [(decode_codes(r["codes.npy"]), json.loads(r["meta.json"]))
            for url in resolve_shards(out_dir) for r in iter_shard_samples(url, lambda e: (_ for _ in ()).throw(e))]


def check_recalls(codes, meta, sp, spec: LongRecallSpec, tolerance: int):
    recalls = meta["recalls"]
    assert len(recalls) == len(spec.distances)
    assert len({r["kind"] for r in recalls}) == len({r["value"] for r in recalls}) == len(recalls)
    assert sorted(r["target_delay_frames"] for r in recalls) == sorted(spec.distances)
    for r in recalls:
        (f0, f1), (r0, r1) = r["fact_span"], r["recall_span"]
        # the value is in Moshi's text stream where it confirms the fact and where it recalls it
        assert codes[0, f0:f1].tolist() == codes[0, r0:r1].tolist()
        assert sp.decode(codes[0, r0:r1].tolist()) == r["value"]  # its own tokens, no full stop
        assert r["delay_frames"] == r0 - f1 and abs(r["delay_frames"] - r["target_delay_frames"]) <= tolerance, r
        assert r["user_fact_audio_span"][1] <= r["fact_audio_span"][0] < r["recall_audio_span"][0]
        assert r["fact_audio_span"][0] == f0 and r["recall_audio_span"][0] == r0  # text starts with the word
    assert [r["recall_span"][0] for r in recalls] == sorted(r["recall_span"][0] for r in recalls)


@needs_espeak
def test_spoken_long_conversations_recall_each_fact_at_its_distance(codec, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(codec / "tokenizer.model"))
    spec = LongRecallSpec(distances=(60, 250, 150))
    result = build_audio_recall_set(tmp_path / "free", codec / "tokenizer.model", codec / "mimi", 2, spec, seed=4,
                                    progress=False)
    assert result.report["samples"] == 2 and result.report["skipped_total"] == 0
    samples = read(tmp_path / "free" / "shards")
    for codes, meta in samples:
        check_recalls(codes, meta, sp, spec, tolerance=40)
        assert meta["level"] == "audio" and meta["frames"] == codes.shape[1]
    assert samples[0][1]["recalls"] != samples[1][1]["recalls"]
    # a fixed length: the conversation is cut there, facts placed so that every recall still fits
    cut = LongRecallSpec(distances=(40, 120), seconds=40)
    build_audio_recall_set(tmp_path / "cut", codec / "tokenizer.model", codec / "mimi", 1, cut, progress=False)
    ((codes, meta),) = read(tmp_path / "cut" / "shards")
    assert codes.shape[1] <= 500 and meta["seconds"] <= 40
    check_recalls(codes, meta, sp, cut, tolerance=150)
    # a rerun keeps what it finds (same settings): the audio is not spoken again
    wav = tmp_path / "cut" / "audio" / "recall-00000.wav"
    before = wav.stat().st_mtime_ns
    build_audio_recall_set(tmp_path / "cut", codec / "tokenizer.model", codec / "mimi", 1, cut, progress=False)
    assert wav.stat().st_mtime_ns == before


FAKE_TTS = textwrap.dedent("""
    import argparse, numpy as np, soundfile as sf
    p = argparse.ArgumentParser()
    p.add_argument("--text"); p.add_argument("--out"); p.add_argument("--speaker", type=int)
    a = p.parse_args()
    if "fail" in a.text:
        raise SystemExit("cannot say that")
    rate, t = 16000, []
    for i, word in enumerate(a.text.split()):  # a tone per word, a short silence between
        n = int(0.06 * rate * len(word))
        t += [0.3 * np.sin(2 * np.pi * (200 + 100 * a.speaker + 20 * i) * np.arange(n) / rate), np.zeros(800)]
    sf.write(a.out, np.concatenate([np.zeros(1600), *t]), rate)
""")


@needs_espeak  # the recall set is prepared like any corpus; the TTS itself is the fake command
def test_a_tts_command_speaks_the_turns(codec, tmp_path, capsys):
    script = tmp_path / "fake_tts.py"
    script.write_text(FAKE_TTS)
    tts = f"{sys.executable} {script} --text {{text}} --out {{wav}} --speaker {{speaker}}"
    spec = LongRecallSpec(distances=(50, 100))
    result = build_audio_recall_set(tmp_path / "cmd", codec / "tokenizer.model", codec / "mimi", 1, spec,
                                    progress=False, tts=tts)
    assert result.report["samples"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(codec / "tokenizer.model"))
    ((codes, meta),) = read(tmp_path / "cmd" / "shards")
    check_recalls(codes, meta, sp, spec, tolerance=60)
    words = json.loads((tmp_path / "cmd" / "audio" / "recall-00000.json").read_text())["alignments"]
    assert all(end > start for _, (start, end), _ in words)
    assert meta["settings"]["tts"] == tts
    # templates and commands that cannot work are named
    assert main(["audio", str(tmp_path / "x"), "--tokenizer", str(codec / "tokenizer.model"), "--mimi",
                 str(codec / "mimi"), "--distances", "40", "--tts", "my_tts --text {text}"]) == 2
    assert "needs {text} and {wav} (missing {wav})" in capsys.readouterr().err
    from moshi_ttt.data.espeak import CommandTTS

    with pytest.raises(RuntimeError, match="cannot say that"):
        CommandTTS(tts, 1).speak(("please", "fail"), np.random.default_rng(0), (0.1, 0.2))
    with pytest.raises(RuntimeError, match="cannot run 'no-such-tts-binary'"):
        CommandTTS("no-such-tts-binary {text} {wav}", 0).speak(("hello",), np.random.default_rng(0), (0.1, 0.2))


def test_distances_that_cannot_fit_are_refused(codec, tmp_path, capsys):
    common = ["--tokenizer", str(codec / "tokenizer.model"), "--mimi", str(codec / "mimi")]
    assert main(["audio", str(tmp_path / "r"), *common, "--distances", "750,3000", "--minutes", "3"]) == 2
    assert "cannot hold a recall 3000 frames after its fact: it needs at least 262 s" in capsys.readouterr().err
    assert main(["audio", str(tmp_path / "r"), *common, "--distances", ",".join(["100"] * 9)]) == 2
    assert "at most 8 facts per conversation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audio", str(tmp_path / "r"), *common, "--distances", "10,abc"])
    assert not (tmp_path / "r").exists()  # refused before anything was written


@needs_espeak
def test_the_recall_evaluation_scores_every_fact_of_a_conversation(codec, tmp_path, tiny_lm_kwargs):
    from moshi_ttt.eval.recall import attention_span, recall_report, window_split
    from moshi_ttt.models import MoshiSourceConfig, load_base_moshi

    spec = LongRecallSpec(distances=(30, 200))
    build_audio_recall_set(tmp_path / "set", codec / "tokenizer.model", codec / "mimi", 2, spec, progress=False)
    model = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs={**tiny_lm_kwargs, "text_card": 320,
                                                                         "context": 100}))
    assert attention_span(model) == 100
    report = recall_report(model, str(tmp_path / "set" / "shards"))
    facts = [r for _, m in read(tmp_path / "set" / "shards") for r in m["recalls"]]
    assert sorted(report["by_delay"]) == sorted({r["delay_frames"] for r in facts})
    assert len(report["samples"]) == 4 and {s["kind"] for s in report["samples"]} == {r["kind"] for r in facts}
    # every value's own text tokens are scored, nothing else
    assert report["tokens"] == sum(r["recall_span"][1] - r["recall_span"][0] for r in facts)
    split = window_split(report, 100)
    near = [s for s in report["samples"] if s["delay_frames"] < 100]
    assert split["in_window_tokens"] == sum(s["text_tokens"] for s in near) > 0
    assert split["beyond_window_tokens"] == report["tokens"] - split["in_window_tokens"] > 0
    assert np.isnan(window_split(report, None)["beyond_window"])
