"""Token shards: the one on-disk format between data preparation and training.

A shard is a webdataset tar whose samples hold ``codes.npy`` (int16 ``[17, T]``: the text
stream then 16 Mimi codebooks at 12.5 Hz) and ``meta.json``. A shard directory also holds
``index.json`` (per-shard sample counts, frames and sha256) so that readers know the data
without scanning it and preparation can tell finished shards from partial ones.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds

from moshi_ttt.constants import FRAME_RATE, seconds_to_frames  # noqa: F401 (seconds_to_frames: re-exported)

logger = logging.getLogger(__name__)

NUM_STREAMS = 17  # 1 text + 8 Moshi codebooks + 8 user codebooks
INDEX_NAME = "index.json"


class ShardFormatError(ValueError):
    """A sample or shard that does not follow the token-shard format."""


def encode_codes(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(codes.astype(np.int16)), allow_pickle=False)
    return buf.getvalue()


def decode_codes(data: bytes, num_streams: int = NUM_STREAMS) -> np.ndarray:
    """Parse ``codes.npy`` bytes, refusing anything that is not int16 ``[num_streams, T>0]``."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 2 or arr.shape[0] != num_streams or arr.shape[1] == 0:
        raise ShardFormatError(f"codes.npy has shape {arr.shape}, expected [{num_streams}, T>0]")
    if arr.dtype != np.int16:
        raise ShardFormatError(f"codes.npy has dtype {arr.dtype}, expected int16")
    return arr


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    num_frames: int
    sha256: str


@dataclass
class ShardIndex:
    """What a shard directory holds; written atomically after every finished shard."""

    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def total_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def total_frames(self) -> int:
        return sum(s.num_frames for s in self.shards)

    @property
    def total_hours(self) -> float:
        return self.total_frames / FRAME_RATE / 3600

    def to_json(self) -> dict:
        return {
            "format": "moshi-ttt-token-shards/1",
            "frame_rate": FRAME_RATE,
            "num_streams": NUM_STREAMS,
            "total_samples": self.total_samples,
            "total_frames": self.total_frames,
            "total_hours": self.total_hours,
            "shards": [s.__dict__ for s in self.shards],
            **self.extra,
        }

    @classmethod
    def load(cls, directory: str | Path) -> ShardIndex:
        path = Path(directory) / INDEX_NAME
        try:
            raw = json.loads(path.read_text())
            shards = [ShardInfo(**s) for s in raw["shards"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exn:
            raise ShardFormatError(f"{path}: unreadable shard index ({exn})") from exn
        known = {"format", "frame_rate", "num_streams", "total_samples", "total_frames", "total_hours", "shards"}
        return cls(shards=shards, extra={k: v for k, v in raw.items() if k not in known})

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / INDEX_NAME, self.to_json())


class TokenShardWriter:
    """Writes token samples into ``{prefix}-{n:06d}.tar`` shards with webdataset's ShardWriter.

    Each shard is written under a temporary name and renamed when complete, and the index is
    updated after each shard, so a crash never leaves a truncated shard that looks finished.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        max_samples_per_shard: int = 1000,
        max_bytes_per_shard: float = 1e9,
        start_shard: int = 0,
        index: ShardIndex | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = index if index is not None else ShardIndex()
        self._pending_samples = 0
        self._pending_frames = 0
        self._writer = wds.ShardWriter(
            str(self.out_dir / f"{prefix}-%06d.tar"),
            maxcount=max_samples_per_shard,
            maxsize=max_bytes_per_shard,
            start_shard=start_shard,
            verbose=0,
            opener=lambda fname: open(fname + ".tmp", "wb"),
            post=self._finish_shard,
        )

    def _finish_shard(self, fname: str) -> None:
        os.replace(fname + ".tmp", fname)
        if self._pending_samples == 0:
            os.remove(fname)
            return
        self.index.shards.append(
            ShardInfo(Path(fname).name, self._pending_samples, self._pending_frames, sha256_file(fname))
        )
        self.index.save(self.out_dir)
        self._pending_samples = 0
        self._pending_frames = 0

    def write(self, key: str, codes: np.ndarray, meta: dict | None = None) -> None:
        if codes.ndim != 2 or codes.shape[0] != NUM_STREAMS:
            raise ShardFormatError(f"sample {key!r}: codes shape {codes.shape}, expected [{NUM_STREAMS}, T]")
        # ShardWriter opens the next shard lazily inside write(); account for the sample after it.
        self._writer.write({"__key__": key, "codes.npy": encode_codes(codes),
                            "meta.json": json.dumps(meta or {}).encode()})
        self._pending_samples += 1
        self._pending_frames += int(codes.shape[1])

    def close(self) -> ShardIndex:
        self._writer.close()
        self.index.save(self.out_dir)
        return self.index

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_shards(source: str | Path | Iterable[str]) -> list[str]:
    """Shard paths from a directory (its index, else ``*.tar``), a glob, a brace pattern or a list.

    Raises an error naming the source when it yields nothing or names missing files, so a
    typo in ``data.train_shards`` fails before any compute.
    """
    if not isinstance(source, (str, Path)):
        paths: list[str] = []
        for item in source:
            paths.extend(resolve_shards(item))
        return paths
    source = str(source)
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, INDEX_NAME)):
            names = [s.name for s in ShardIndex.load(source).shards]
            paths = [os.path.join(source, n) for n in names]
            unlisted = sorted(set(os.path.basename(p) for p in glob.glob(os.path.join(source, "*.tar"))) - set(names))
            if unlisted:
                logger.warning("%d shard(s) in %s are not listed in its %s and will not be read: %s%s",
                               len(unlisted), source, INDEX_NAME, ", ".join(unlisted[:5]),
                               " ..." if len(unlisted) > 5 else "")
        else:
            paths = sorted(glob.glob(os.path.join(source, "*.tar")))
        if not paths:
            raise FileNotFoundError(f"shard directory {source} holds no .tar shards")
    elif any(c in source for c in "*?["):
        paths = sorted(glob.glob(source))
        if not paths:
            raise FileNotFoundError(f"shard pattern {source} matches no file")
    elif "{" in source:
        import braceexpand

        paths = list(braceexpand.braceexpand(source))
    else:
        paths = [source]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return paths


def index_checksums(source: str | Path | Iterable[str]) -> dict[str, str]:
    """shard path -> sha256 recorded in the ``index.json`` of the directories ``source`` names
    (empty for globs, lists of files and directories without an index)."""
    if not isinstance(source, (str, Path)):
        out: dict[str, str] = {}
        for item in source:
            out.update(index_checksums(item))
        return out
    source = str(source)
    if not (os.path.isdir(source) and os.path.exists(os.path.join(source, INDEX_NAME))):
        return {}
    return {os.path.join(source, s.name): s.sha256 for s in ShardIndex.load(source).shards if s.sha256}


def iter_shard_samples(url: str, on_error) -> Iterator[dict]:
    """Raw samples of one tar shard through webdataset's tar reader; errors go to ``on_error``."""
    yield from wds.tarfile_to_samples(handler=on_error)([{"url": url}])
