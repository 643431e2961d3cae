"""Weighted data sources: webdataset's RandomMix over per-source streams, per-stage mixtures, an exact
resume of the mixture, per-source counts in the checkpoint, and one-line errors for bad settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from moshi_ttt.config.errors import ConfigError
from moshi_ttt.config.schema import Stage
from moshi_ttt.config.validate import validate_config
from moshi_ttt.data import MixedSequenceDataset, StreamPosition, TokenSequenceDataset, write_synthetic_shards
from moshi_ttt.data.stream import consumed_positions
from moshi_ttt.training.curriculum import Curriculum
from moshi_ttt.training.datamodule import TokenDataModule


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_synthetic_shards(root / "a", num_samples=48, num_frames=(40, 120), card=64, text_card=64,
                           samples_per_shard=6, seed=0)
    write_synthetic_shards(root / "b", num_samples=24, num_frames=(30, 60), card=64, text_card=64,
                           samples_per_shard=6, seed=1)
    return root / "a", root / "b"


def _mixture(a, b, weights=(3.0, 1.0), positions=None, draws=None, seq_len=64, packing=False, **kw):
    positions = positions or {}
    streams = [TokenSequenceDataset(shards, seq_len, seed=(5, name), shuffle_buffer=4, packing=packing,
                                    positions=positions.get(i, {}), **kw)
               for i, (name, shards) in enumerate([("a", a), ("b", b)])]
    return MixedSequenceDataset(streams, list(weights), [0, 1], seed=5, draws=draws)


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_mixture_follows_the_weights_and_is_deterministic(two_sources):
    a, b = two_sources
    items = _take(_mixture(a, b), 400)
    share = sum(it["source"] == 0 for it in items) / len(items)
    assert 0.68 < share < 0.82, share  # weights 3:1
    assert [it["draw"] for it in items] == list(range(1, 401))
    again = _take(_mixture(a, b), 400)
    assert [(it["source"], it["key"]) for it in items] == [(it["source"], it["key"]) for it in again]
    # each source's own stream is untouched by the mixing: source b's sequences are b's stream in order
    alone = _take(TokenSequenceDataset(b, 64, seed=(5, "b"), shuffle_buffer=4), 20)
    assert [it["key"] for it in items if it["source"] == 1][:20] == [it["key"] for it in alone]
    other = _take(_mixture(a, b, weights=(1.0, 1.0)), 400)
    assert 0.42 < sum(it["source"] == 0 for it in other) / 400 < 0.58


@pytest.mark.parametrize("packing", [False, True])
def test_mixture_resumes_exactly_from_a_consumed_batch(two_sources, packing):
    a, b = two_sources
    seq_len = 150 if packing else 64
    full = _take(_mixture(a, b, seq_len=seq_len, packing=packing), 60)
    for cut in (0, 7, 33):
        positions, draws = consumed_positions(default_collate(full[: cut + 1]))
        by_source = {src: {stream: pos} for (stream, src), pos in positions.items()}
        resumed = _take(_mixture(a, b, positions=by_source, draws=draws, seq_len=seq_len, packing=packing), 20)
        for x, y in zip(full[cut + 1:], resumed):
            assert (x["source"], x["key"], x["draw"]) == (y["source"], y["key"], y["draw"]), cut
            assert torch.equal(x["codes"], y["codes"]) and torch.equal(x["segments"], y["segments"])


def test_every_rank_and_worker_reads_its_own_stream_of_each_source(two_sources):
    a, b = two_sources
    keys = []
    for rank in range(2):
        ds = _mixture(a, b, weights=(1.0, 1.0), rank=rank, world_size=2, resampled=False)
        ds.check_streams(num_workers=2)
        seen = []
        for i, batch in enumerate(DataLoader(ds, batch_size=2, num_workers=2)):
            assert len(set(batch["stream"].tolist())) == 1  # a batch comes from one worker's stream
            seen += list(zip(batch["source"].tolist(), batch["key"]))
            if i + 1 == 6:
                break
        keys.append(seen)
    assert not set(keys[0]) & set(keys[1])  # ranks never share a sample of either source
    assert {s for s, _ in keys[0] + keys[1]} == {0, 1}
    with pytest.raises(ValueError, match="resampled"):
        _mixture(a, b, rank=0, world_size=4, resampled=False).check_streams(num_workers=4)  # b has 4 shards


def _datamodule(a, b, stages):
    dm = TokenDataModule(train_shards=None, seq_len=64, batch_size=2, seed=3, shuffle_buffer=4,
                         sources={"a": {"shards": str(a), "weight": 1.0}, "b": {"shards": str(b), "weight": 1.0}})
    dm.curriculum = Curriculum([Stage(**s) for s in stages])
    return dm


def _fake_trainer(step: int, epoch: int):
    return SimpleNamespace(global_step=step, current_epoch=epoch, global_rank=0, world_size=1,
                           lightning_module=SimpleNamespace(model=None))


def test_each_stage_draws_its_own_mixture_and_the_counts_survive_a_checkpoint(two_sources):
    a, b = two_sources
    stages = [dict(name="s0", seconds=5.12, steps=4, sources={"a": 1.0}),
              dict(name="s1", seconds=5.12, steps=4, sources={"a": 1.0, "b": 3.0}),
              dict(name="s2", seconds=5.12, steps=4)]  # none: data.sources' own weights
    dm = _datamodule(a, b, stages)
    seen = {}
    for epoch in range(3):
        dm.trainer = _fake_trainer(4 * epoch, epoch)
        assert dm.stage_sources() == [[(0, 1.0)], [(0, 1.0), (1, 3.0)], [(0, 1.0), (1, 1.0)]][epoch]
        sources = []
        for batch in dm.train_dataloader():
            dm.record_batch(batch)
            sources += batch["source"].tolist()
        seen[epoch] = sources
    assert set(seen[0]) == {0} and len(seen[1]) == len(seen[2]) == 4 and 1 in seen[1]
    assert dm.source_samples() == {"a": seen[0].count(0) + seen[1].count(0) + seen[2].count(0),
                                   "b": seen[1].count(1) + seen[2].count(1)}
    # what a checkpoint stores (gathered from every rank), and a fresh module restored from it
    dm.set_gathered_state([dm.local_state()])
    state = dm.state_dict()
    restored = _datamodule(a, b, stages)
    restored.load_state_dict(state)
    assert restored.positions == dm.positions and restored.draws == dm.draws and restored.samples == dm.samples
    assert set(state["positions"][0]) == {"a", "b"} and sum(state["samples"][0].values()) == 12


def test_a_checkpoint_from_before_sources_resumes_the_single_source():
    dm = TokenDataModule(train_shards="unused", seq_len=64)
    dm.load_state_dict({"positions": {0: {0: (3, 2), 1: (1, 0)}}, "batches_consumed": 9, "seq_len": 64})
    assert dm.positions == {0: {"train": {0: StreamPosition(3, 2), 1: StreamPosition(1, 0)}}}
    assert dm.source_names == ["train"] and dm._source_seed("train") == 0  # the streams it was seeded with


@pytest.mark.parametrize("overrides, message", [
    (["curriculum=demo", "++curriculum.stages.1.sources={synthetic: 1.0, recal: 0.5}"],
     "curriculum.stages.1.sources.recal=0.5: no source 'recal' in data.sources (it has: synthetic, recall)"),
    (["++data.sources.recall.weight=0"],
     "data.sources.recall.weight=0: a weight > 0 (the source's share of the sequences is weight / the sum"),
    (["++data.sources.recall.weight=-1"], "data.sources.recall.weight=-1: a weight > 0"),
    (["curriculum=demo", "++curriculum.stages.2.sources={synthetic: 1.0, recall: 0}"],
     "curriculum.stages.2.sources.recall=0.0: a weight > 0"),
    (["data.sources.recall.shards=/no/such/dir"],
     "data.sources.recall.shards='/no/such/dir': shard(s) not found: /no/such/dir"),
    (["+data.sources.extra.weight=1"], "data.sources.extra.shards is not set (a shard directory"),
    (["data.sources.synthetic.shards=${data.sources.recall.shards}"],
     "data.train_shards="),
])
def test_bad_sources_are_one_line_errors_before_compute(compose_cfg, two_sources, overrides, message):
    _, b = two_sources
    cfg = compose_cfg("experiment=smoke", "+data.sources.synthetic.shards=${data.train_shards}",
                      f"+data.sources.recall.shards={b}", *overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_sources_compose_and_validate(compose_cfg, two_sources):
    _, b = two_sources
    cfg = compose_cfg("experiment=smoke", "curriculum=demo", "+data.sources.synthetic.shards=${data.train_shards}",
                      f"+data.sources.recall.shards={b}", "+data.sources.recall.weight=0.5",
                      "++curriculum.stages.2.sources={synthetic: 1.0, recall: 0.5}")
    validate_config(cfg)
    assert cfg.data.sources.recall.weight == 0.5 and "weight" not in cfg.data.sources.synthetic  # 1 by default
    with pytest.raises(ConfigError, match="data.train_shards is not set"):
        validate_config(compose_cfg("experiment=smoke", "data.train_shards=null", "data.synthetic=null"))
    # without data.sources, a stage may name the one source of data.train_shards
    validate_config(compose_cfg("experiment=smoke", "curriculum=demo", "++curriculum.stages.0.sources={train: 1.0}"))
