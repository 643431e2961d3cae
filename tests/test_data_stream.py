"""Token shards and the training reader: format, splitting, resuming, surviving bad data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from moshi_ttt.data import (
    PAD_TOKEN,
    ShardIndex,
    StreamPosition,
    TokenSequenceDataset,
    TokenShardWriter,
    resolve_shards,
    seconds_to_frames,
    write_synthetic_shards,
)
from moshi_ttt.data.shards import sha256_file


@pytest.fixture
def shard_dir(tmp_path):
    write_synthetic_shards(tmp_path / "shards", num_samples=48, num_frames=(40, 120), card=64, text_card=64,
                           samples_per_shard=6, seed=0)
    return tmp_path / "shards"


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_frame_arithmetic():
    assert seconds_to_frames(15) == 188
    assert seconds_to_frames(60) == 750
    assert seconds_to_frames(300) == 3750
    assert seconds_to_frames(1800) == 22500


def test_writer_index_and_checksums(shard_dir):
    index = ShardIndex.load(shard_dir)
    assert index.total_samples == 48 and len(index.shards) == 8
    for info in index.shards:
        assert sha256_file(shard_dir / info.name) == info.sha256
    assert not list(shard_dir.glob("*.tmp"))
    raw = json.loads((shard_dir / "index.json").read_text())
    assert raw["total_hours"] == pytest.approx(index.total_frames / 12.5 / 3600)


def test_crop_and_pad(tmp_path):
    with TokenShardWriter(tmp_path, max_samples_per_shard=10) as w:
        w.write("short", np.arange(17 * 5, dtype=np.int16).reshape(17, 5) % 60, {})
        w.write("long", np.ones((17, 50), dtype=np.int16), {})
    items = {it["key"]: it for it in _take(TokenSequenceDataset(tmp_path, seq_len=20, shuffle_buffer=1), 2)}
    short = items["short"]["codes"]
    assert short.shape == (17, 20) and short.dtype == torch.int64
    assert (short[:, 5:] == PAD_TOKEN).all() and (short[:, :5] >= 0).all()
    assert (items["long"]["codes"] == 1).all()


def test_resume_from_position_continues_the_stream(shard_dir):
    ds = TokenSequenceDataset(shard_dir, seq_len=64, seed=3, shuffle_buffer=4)
    full = _take(ds, 30)
    cut = full[11]
    resumed = _take(TokenSequenceDataset(shard_dir, seq_len=64, seed=3, shuffle_buffer=4,
                                         positions={0: StreamPosition(cut["shard_seq"], cut["emitted"])}), 18)
    for a, b in zip(full[12:], resumed):
        assert a["key"] == b["key"]
        assert torch.equal(a["codes"], b["codes"])


def test_ranks_and_workers_read_disjoint_samples(shard_dir):
    """2 ranks x 2 workers: one epoch of non-resampled data, every sample seen exactly once."""
    seen = []
    for rank in range(2):
        ds = TokenSequenceDataset(shard_dir, seq_len=32, rank=rank, world_size=2, resampled=False)
        ds.check_streams(num_workers=2)
        loader = DataLoader(ds, batch_size=3, num_workers=2)
        per_rank = []
        for i, batch in enumerate(loader):
            per_rank.extend(batch["key"])
            if i + 1 == 4:  # 2 workers x 2 shards x 6 samples / 3 per batch
                break
        seen.append(per_rank)
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 24 and sum(map(len, seen)) == 24


def test_too_few_shards_for_the_streams_is_refused(shard_dir):
    ds = TokenSequenceDataset(shard_dir, seq_len=32, rank=0, world_size=4, resampled=False)
    with pytest.raises(ValueError, match="resampled"):
        ds.check_streams(num_workers=4)


def test_corrupt_shard_and_bad_samples_are_skipped_and_counted(tmp_path):
    d = tmp_path / "bad"
    with TokenShardWriter(d, max_samples_per_shard=4) as w:
        for i in range(8):
            w.write(f"ok{i}", np.full((17, 30), i, dtype=np.int16), {})
    # a truncated tar (as left by a crashed copy) ...
    victim = d / ShardIndex.load(d).shards[1].name
    victim.write_bytes(victim.read_bytes()[:1500])
    # ... and a shard with samples of the wrong shape / dtype / garbage bytes
    import io

    import webdataset as wds

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    with wds.TarWriter(str(d / "zz-bad.tar")) as tw:
        tw.write({"__key__": "shape", "codes.npy": npy(np.zeros((3, 30), np.int16)), "meta.json": b"{}"})
        tw.write({"__key__": "dtype", "codes.npy": npy(np.zeros((17, 30), np.float32)), "meta.json": b"{}"})
        tw.write({"__key__": "garbage", "codes.npy": b"not a numpy file", "meta.json": b"{}"})
        tw.write({"__key__": "good", "codes.npy": npy(np.full((17, 30), 42, np.int16)), "meta.json": b"{}"})
    urls = [str(d / s.name) for s in ShardIndex.load(d).shards] + [str(d / "zz-bad.tar")]
    ds = TokenSequenceDataset(urls, seq_len=30, resampled=False, shuffle_buffer=1)
    items = _take(ds, 6)  # first epoch over the 3 shards yields every good sample
    keys = {it["key"] for it in items}
    assert {"ok0", "ok1", "ok2", "ok3", "good"} <= keys
    assert items[-1]["skipped"] >= 4  # 3 bad samples + the truncated shard


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_shards(str(tmp_path / "*.tar"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="holds no"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="seq_len"):
        TokenSequenceDataset([], seq_len=0)


@pytest.mark.parametrize("minutes", [5, 30])
def test_packing_short_conversations_to_long_stages(tmp_path, minutes):
    """Conversations of 30-90 s packed into 5- and 30-minute sequences: no padding, segment ids
    mark each conversation, and resuming after a packed sequence continues the stream."""
    write_synthetic_shards(tmp_path / "s", num_samples=80, num_frames=(375, 1125), card=64, text_card=64,
                           samples_per_shard=20, seed=1)
    frames = seconds_to_frames(minutes * 60)
    ds = TokenSequenceDataset(tmp_path / "s", seq_len=frames, packing=True, resampled=True)
    items = _take(ds, 3)
    for it in items:
        assert it["codes"].shape == (17, frames) and (it["codes"] >= 0).all()
        seg = it["segments"]
        assert seg[0] == 0 and (seg[1:] >= seg[:-1]).all() and int(seg[-1]) + 1 == len(it["key"].split("+"))
        assert int(seg[-1]) >= frames // 1125 - 1
    resumed = _take(TokenSequenceDataset(tmp_path / "s", seq_len=frames, packing=True, resampled=True,
                                         positions={0: StreamPosition(items[0]["shard_seq"], items[0]["emitted"])}), 2)
    assert [r["key"] for r in resumed] == [it["key"] for it in items[1:]]
    assert all(torch.equal(r["codes"], it["codes"]) for r, it in zip(resumed, items[1:]))


def _npy(a):
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_token_ids_outside_the_vocabulary_are_skipped_and_named(tmp_path, caplog):
    import webdataset as wds

    d = tmp_path / "vocab"
    d.mkdir()
    text_high, audio_high, negative = (np.full((17, 30), 5, np.int16) for _ in range(3))
    text_high[0, 7] = 64  # == text_card
    audio_high[9, 3] = 70  # > card
    negative[4, :5] = -5  # not the padding value
    with wds.TarWriter(str(d / "s.tar")) as tw:
        for key, codes in [("text_high", text_high), ("audio_high", audio_high), ("negative", negative),
                           ("good", np.full((17, 30), 63, np.int16))]:
            tw.write({"__key__": key, "codes.npy": _npy(codes), "meta.json": b"{}"})
    with caplog.at_level("WARNING"):
        items = _take(TokenSequenceDataset(str(d / "s.tar"), seq_len=30, card=64, text_card=64, shuffle_buffer=1,
                                           resampled=True), 2)
    assert sorted(it["key"] for it in items) == ["good", "negative"]
    assert items[-1]["skipped"] == 2 and items[-1]["negative_ids"] == 1
    neg = next(it for it in items if it["key"] == "negative")["codes"]
    assert (neg[4, :5] == PAD_TOKEN).all() and (neg >= PAD_TOKEN).all()
    for key, what in [("text_high", "text_card=64"), ("audio_high", "card=64")]:
        line = next(r.getMessage() for r in caplog.records if repr(key) in r.getMessage())
        assert str(d / "s.tar") in line and what in line
    assert any("'negative'" in r.getMessage() and "padding" in r.getMessage() for r in caplog.records)


def test_shard_checksums_and_unlisted_shards(tmp_path, caplog):
    d = tmp_path / "sums"
    with TokenShardWriter(d, max_samples_per_shard=4) as w:
        for i in range(8):
            w.write(f"s{i}", np.full((17, 30), i, dtype=np.int16), {})
    names = [s.name for s in ShardIndex.load(d).shards]
    (d / "stray.tar").write_bytes((d / names[0]).read_bytes())  # on disk, not in index.json
    with caplog.at_level("WARNING"):
        resolve_shards(d)
    assert any("stray.tar" in r.getMessage() and "index.json" in r.getMessage() for r in caplog.records)
    victim = d / names[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # tar padding: still a readable tar, but not the bytes that were indexed
    victim.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("WARNING"):
        items = _take(TokenSequenceDataset(d, seq_len=30, resampled=False, shuffle_buffer=1), 8)
    keys = [it["key"] for it in items]
    assert set(keys) == {"s0", "s1", "s2", "s3"} and items[-1]["skipped"] >= 1  # shard 1 never read
    assert any(names[1] in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
    unchecked = _take(TokenSequenceDataset(d, seq_len=30, resampled=False, shuffle_buffer=1,
                                           verify_checksums=False), 8)
    assert {it["key"] for it in unchecked} == {f"s{i}" for i in range(8)}
    # nothing readable at all: the error names the directory
    only = tmp_path / "only"
    with TokenShardWriter(only, max_samples_per_shard=4) as w:
        w.write("x", np.zeros((17, 30), dtype=np.int16), {})
    tar = only / ShardIndex.load(only).shards[0].name
    tar.write_bytes(tar.read_bytes()[:-1] + b"\x01")
    with pytest.raises(RuntimeError, match=f"consecutive shards of {only}"):
        _take(TokenSequenceDataset(only, seq_len=30, resampled=True), 1)
