"""The DataModule: token shards -> [B, 17, T] batches, with a checkpointable data position."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from moshi_ttt.data import StreamPosition, TokenSequenceDataset, consumed_positions, resolve_shards
from moshi_ttt.data.synthetic import write_synthetic_shards

logger = logging.getLogger(__name__)


class TokenDataModule(L.LightningDataModule):
    """Reads token shards; remembers, per rank, how far each stream was consumed.

    The position is checkpointed through ``state_dict`` after being gathered from every rank
    (see ``DataPositionCallback``), so a resume continues with the next unseen sample.
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
        # rank -> {stream -> StreamPosition}, and batches consumed per rank (same on every rank)
        self.positions: dict[int, dict[int, StreamPosition]] = {}
        self.local_positions: dict[int, StreamPosition] = {}
        self.batches_consumed = 0
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
        resolve_shards(self.train_shards)
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
        step = self.trainer.global_step if self.trainer is not None else 0
        if for_validation:
            i, left = self.curriculum.locate(max(step - 1, 0))[0], 0
        else:
            epoch = self.trainer.current_epoch if self.trainer is not None else 0
            i, left = self.curriculum.stage_of_epoch(epoch, step)
        stage = self.curriculum.stages[i]
        self.reset_at_boundaries = stage.reset_at_boundaries
        return stage.frames, stage.batch_size, stage.packing, (left * stage.accumulate,
                                                               stage.steps * stage.accumulate)

    def train_dataloader(self):
        rank, world = self._rank_world()
        workers = max(1, self.num_workers)
        seq_len, batch_size, packing, stage_batches = self.stage_settings()
        if stage_batches is not None:
            logger.info("train loader for epoch %d at step %d: %d frames, %d of the stage's %d batches left",
                        self.trainer.current_epoch if self.trainer is not None else 0,
                        self.trainer.global_step if self.trainer is not None else 0, seq_len, *stage_batches)
        ds = TokenSequenceDataset(
            self.train_shards, seq_len, seed=self.seed, rank=rank, world_size=world,
            resampled=self.resampled, shuffle_buffer=self.shuffle_buffer, random_crop=self.random_crop,
            min_frames=self.min_frames, positions=self.positions.get(rank, {}),
            worker_rotation=self.batches_consumed % workers, packing=packing,
            reset_at_boundaries=self.reset_at_boundaries, verify_checksums=self.verify_checksums,
            **self.vocabulary(),
        )
        ds.check_streams(self.num_workers)
        # Positions persist across stages: a new stage continues the streams where they are.
        self.local_positions = {**self.positions.get(rank, {}), **self.local_positions}
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
        self.local_positions.update(consumed_positions(batch))
        self.batches_consumed += 1

    def state_dict(self) -> dict:
        return {
            "positions": {r: {s: (p.shard_seq, p.emitted) for s, p in ps.items()} for r, ps in self.positions.items()},
            "batches_consumed": self.batches_consumed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        self.positions = {int(r): {int(s): StreamPosition(*p) for s, p in ps.items()}
                          for r, ps in state.get("positions", {}).items()}
        self.batches_consumed = int(state.get("batches_consumed", 0))
        logger.info("data position restored: %d batches consumed, %d rank(s)", self.batches_consumed,
                    len(self.positions))


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
