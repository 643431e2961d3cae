"""The DataModule: token shards -> [B, 17, T] batches, with a checkpointable data position.

The training data is one or more named sources (``data.sources``: shards and a weight each; a
single ``data.train_shards`` is the source ``train``) mixed by webdataset's ``RandomMix``
(``moshi_ttt.data.stream.MixedSequenceDataset``); a curriculum stage may give its own weights or
a subset of the sources (``curriculum.stages.N.sources``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from moshi_ttt.data import StreamPosition, TokenSequenceDataset, consumed_positions, resolve_shards
from moshi_ttt.data.stream import MixedSequenceDataset
from moshi_ttt.data.synthetic import write_synthetic_shards

logger = logging.getLogger(__name__)


#: The source a lone ``data.train_shards`` becomes (its streams are seeded as before sources existed).
DEFAULT_SOURCE = "train"


class TokenDataModule(L.LightningDataModule):
    """Reads token shards; remembers, per rank, how far each stream of each source was consumed.

    The position (per source and stream, plus the mixture's draws per stream) and the sequences
    taken from each source are checkpointed through ``state_dict`` after being gathered from
    every rank (see ``ResumeStateCallback``), so a resume continues with the next unseen sample.
    """

    def __init__(
        self,
        train_shards,
        seq_len: int,
        batch_size: int = 1,
        val_shards=None,
        num_workers: int = 0,
        seed: int = 0,
        resampled: bool = False,
        shuffle_buffer: int = 64,
        random_crop: bool = True,
        min_frames: int = 1,
        val_batches: int = 2,
        synthetic: dict | None = None,
        verify_checksums: bool = True,
        sources: dict | None = None,
    ):
        super().__init__()
        if seq_len is None or int(seq_len) <= 0:
            raise ValueError(f"data.seq_len must be a positive number of frames, got {seq_len}")
        if int(batch_size) <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.random_crop = random_crop
        self.min_frames = min_frames
        self.val_batches = val_batches
        self.synthetic = dict(synthetic) if synthetic else None
        self.verify_checksums = bool(verify_checksums)  # sha256 of index.json, once per shard and process
        self.sources = source_table(train_shards, sources)
        self.source_names = [name for name, _, _ in self.sources]
        # rank -> {source -> {stream -> StreamPosition}}, rank -> {stream -> mixture draws}, rank ->
        # {source -> sequences taken}; the local_* are this rank's, the others what the last checkpoint gathered
        self.positions: dict[int, dict[str, dict[int, StreamPosition]]] = {}
        self.draws: dict[int, dict[int, int]] = {}
        self.samples: dict[int, dict[str, int]] = {}
        self.local_positions: dict[str, dict[int, StreamPosition]] = {}
        self.local_draws: dict[int, int] = {}
        self.local_samples: dict[str, int] = {}
        self.batches_consumed = 0  # the same on every rank
        self.curriculum = None  # set by train(): stages override seq_len / batch_size / packing
        self.packing = False

    # ---- data that the run creates itself ------------------------------------------------
    def ensure_synthetic(self) -> None:
        """Write the synthetic shards once (atomically) when the config asks for them."""
        if not self.synthetic:
            return
        target = Path(str(self.train_shards))
        if (target / "index.json").exists():
            return
        tmp = target.with_name(target.name + f".tmp-{torch.randint(1 << 30, ()).item()}")
        spec = dict(self.synthetic)
        frames = spec.pop("num_frames")
        write_synthetic_shards(tmp, num_frames=tuple(frames) if isinstance(frames, (list, tuple)) else int(frames),
                               **spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its shards are identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    def validate(self) -> None:
        """Fail before any compute when shards are missing or cannot feed every stream."""
        self.ensure_synthetic()
        for _, shards, _ in self.sources:
            resolve_shards(shards)
        if self.val_shards:
            resolve_shards(self.val_shards)

    def prepare_data(self) -> None:
        self.ensure_synthetic()

    # ---- loaders -------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def vocabulary(self) -> dict:
        """The model's token ranges (``card``, ``text_card``), so a sample outside them is skipped."""
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer is not None else None
        return {"card": getattr(model, "card", None), "text_card": getattr(model, "text_card", None)}

    def stage_settings(self, for_validation: bool = False) -> tuple[int, int, bool, tuple[int, int] | None]:
        """(seq_len, batch_size, packing, (batches left, batches in the stage) or None if endless).

        Training follows Lightning's epoch (one stage per epoch, see ``Curriculum.stage_of_epoch``);
        validation measures the stage of the last finished step, whenever the loader is built.
        """
        if not self.curriculum:
            self.reset_at_boundaries = True
            return self.seq_len, self.batch_size, self.packing, None
        if for_validation:
            step = self.trainer.global_step if self.trainer is not None else 0
            i, left = self.curriculum.locate(max(step - 1, 0))[0], 0
        else:
            i, left = self._epoch_stage()
        stage = self.curriculum.stages[i]
        self.reset_at_boundaries = stage.reset_at_boundaries
        return stage.frames, stage.batch_size, stage.packing, (left * stage.accumulate,
                                                               stage.steps * stage.accumulate)

    def _epoch_stage(self) -> tuple[int, int]:
        """(stage index, optimizer steps left in it) of Lightning's current epoch (under a curriculum)."""
        step = self.trainer.global_step if self.trainer is not None else 0
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.curriculum.stage_of_epoch(epoch, step)

    def stage_sources(self) -> list[tuple[int, float]]:
        """(index in ``self.sources``, weight) of the sources the current stage draws from: its
        ``sources`` when it names them, else every source at its ``data.sources`` weight."""
        stage = self.curriculum.stages[self._epoch_stage()[0]] if self.curriculum else None
        if stage is None or not stage.sources:
            return [(i, weight) for i, (_, _, weight) in enumerate(self.sources)]
        return [(self.source_names.index(name), float(weight)) for name, weight in stage.sources.items()]

    def _source_seed(self, name: str):
        # A lone train_shards keeps the seed it had before named sources existed (same streams).
        return self.seed if self.source_names == [DEFAULT_SOURCE] else (self.seed, name)

    def train_dataloader(self):
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        seq_len, batch_size, packing, stage_batches = self.stage_settings()
        chosen = self.stage_sources()
        if stage_batches is not None:
            logger.info("train loader for epoch %d at step %d: %d frames, %d of the stage's %d batches left, from %s",
                        self.trainer.current_epoch if self.trainer is not None else 0,
                        self.trainer.global_step if self.trainer is not None else 0, seq_len, *stage_batches,
                        ", ".join(f"{self.source_names[i]} ({w:g})" for i, w in chosen))
        rotation = self.batches_consumed % workers
        streams = [
            TokenSequenceDataset(
                self.sources[i][1], seq_len, seed=self._source_seed(self.source_names[i]), rank=rank,
                world_size=world, resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
                random_crop=self.random_crop, min_frames=self.min_frames,
                positions=self.positions.get(rank, {}).get(self.source_names[i], {}), worker_rotation=rotation,
                packing=packing, reset_at_boundaries=self.reset_at_boundaries,
                verify_checksums=self.verify_checksums, **self.vocabulary(),
            )
            for i, _ in chosen
        ]
        ds = MixedSequenceDataset(streams, [w for _, w in chosen], [i for i, _ in chosen], seed=self.seed,
                                  draws=self.draws.get(rank, {}))
        ds.check_streams(self.num_workers)
        # Positions and counts persist across stages: a new stage continues the streams where they
        # are (what this process recorded since the checkpoint wins over the checkpoint's).
        restored = self.positions.get(rank, {})
        self.local_positions = {name: {**restored.get(name, {}), **self.local_positions.get(name, {})}
                                for name in {*restored, *self.local_positions}}
        self.local_draws = {**self.draws.get(rank, {}), **self.local_draws}
        self.local_samples = {**self.samples.get(rank, {}), **self.local_samples}
        loader = DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        if stage_batches is None:
            return loader
        # Lightning counts an epoch's batches from its start, also after a mid-stage resume:
        # report the stage's full length, yield only what is left of it.
        left, total = stage_batches
        return _Take(loader, left, length=total)

    def val_dataloader(self):
        if not self.val_shards:
            return []
        return _LazyLoader(self._val_loader, self.val_batches)

    def _val_loader(self):
        # Built when validation starts, not when Lightning reloads loaders: a resumed run and an
        # uninterrupted one then validate the same stage on the same sequences.
        rank, world = self._rank_world()
        seq_len, batch_size, _, _ = self.stage_settings(for_validation=True)
        ds = TokenSequenceDataset(self.val_shards, seq_len, seed=12345, rank=rank, world_size=world,
                                  resampled=True, random_crop=False, shuffle_buffer=1,
                                  verify_checksums=self.verify_checksums, **self.vocabulary())
        return _Take(DataLoader(ds, batch_size=batch_size, num_workers=0), self.val_batches)

    # ---- position bookkeeping ------------------------------------------------------------
    def record_batch(self, batch: dict) -> None:
        """A consumed training batch: where each of its streams now is, and what each source gave."""
        positions, draws = consumed_positions(batch)
        for (stream, source), pos in positions.items():
            self.local_positions.setdefault(self.source_names[source], {})[stream] = pos
        self.local_draws.update(draws)
        for source in (batch["source"].tolist() if "source" in batch else [0] * len(batch["stream"])):
            name = self.source_names[source]
            self.local_samples[name] = self.local_samples.get(name, 0) + 1
        self.batches_consumed += 1

    def source_samples(self) -> dict[str, int]:
        """Training sequences this rank has taken from each source since the run started."""
        return {name: self.local_samples.get(name, 0) for name in self.source_names}

    def local_state(self) -> dict:
        """This rank's position and counts, as plain types (gathered from every rank at a checkpoint)."""
        return {"positions": {name: {s: (p.shard_seq, p.emitted) for s, p in streams.items()}
                              for name, streams in self.local_positions.items()},
                "draws": dict(self.local_draws), "samples": dict(self.local_samples)}

    def set_gathered_state(self, per_rank: list[dict]) -> None:
        """Every rank's ``local_state()``, in rank order: what the checkpoint stores."""
        self.positions = {rank: {name: {s: StreamPosition(*p) for s, p in streams.items()}
                                 for name, streams in g["positions"].items()} for rank, g in enumerate(per_rank)}
        self.draws = {rank: dict(g["draws"]) for rank, g in enumerate(per_rank)}
        self.samples = {rank: dict(g["samples"]) for rank, g in enumerate(per_rank)}

    def state_dict(self) -> dict:
        return {
            "positions": {r: {name: {s: (p.shard_seq, p.emitted) for s, p in streams.items()}
                              for name, streams in ps.items()} for r, ps in self.positions.items()},
            "draws": {r: dict(d) for r, d in self.draws.items()},
            "samples": {r: dict(n) for r, n in self.samples.items()},
            "batches_consumed": self.batches_consumed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        positions = {}
        for r, ps in state.get("positions", {}).items():
            if ps and not isinstance(next(iter(ps.values())), dict):  # before sources: {stream: (n, e)}
                ps = {DEFAULT_SOURCE: ps}
            positions[int(r)] = {name: {int(s): StreamPosition(*p) for s, p in streams.items()}
                                 for name, streams in ps.items()}
        self.positions = positions
        self.draws = {int(r): {int(s): int(d) for s, d in ds.items()} for r, ds in state.get("draws", {}).items()}
        self.samples = {int(r): {str(k): int(v) for k, v in ns.items()} for r, ns in state.get("samples", {}).items()}
        self.batches_consumed = int(state.get("batches_consumed", 0))
        logger.info("data position restored: %d batches consumed, %d rank(s)", self.batches_consumed,
                    len(self.positions))


def source_table(train_shards, sources: dict | None) -> list[tuple[str, object, float]]:
    """(name, shards, weight) of every training source: ``data.sources`` in their order, else
    ``data.train_shards`` as the one source ``train`` (weight 1)."""
    if not sources:
        if train_shards is None:
            raise ValueError("data.train_shards is not set and data.sources names no source")
        return [(DEFAULT_SOURCE, train_shards, 1.0)]
    out = []
    for name, spec in sources.items():
        spec = dict(spec or {})
        if spec.get("shards") is None:
            raise ValueError(f"data.sources.{name}.shards is not set")
        weight = float(spec.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.sources.{name}.weight={weight}: must be > 0")
        out.append((str(name), spec["shards"], weight))
    return out


class _Take:
    """The first ``n`` batches of an endless loader (a stage, or a fixed validation set)."""

    def __init__(self, loader: DataLoader, n: int, length: int | None = None):
        self.loader, self.n = loader, n
        self.length = n if length is None else length

    def __iter__(self):
        if self.n <= 0:  # a stage restored at its end: not even an iterator (it would draw a seed)
            return
        for i, batch in enumerate(self.loader, 1):
            yield batch
            if i >= self.n:  # stop without reading a batch that nobody will use
                break

    def __len__(self) -> int:
        return self.length


class _LazyLoader:
    """A loader of known length that is built by ``make()`` each time it is iterated."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __iter__(self):
        return iter(self.make())

    def __len__(self) -> int:
        return self.length
