"""Checkpoint I/O: a crash while saving never leaves a half-written checkpoint behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


@contextlib.contextmanager
def _atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A file to write ``path``'s bytes into: a sibling temp file, fsynced, then renamed over the
    target (POSIX-atomic); a failure leaves neither a partial target nor the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with _atomic_write(path) as f:
        torch.save(obj, f)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    with open(source, "rb") as src, _atomic_write(path) as f:
        shutil.copyfileobj(src, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with an explicit write-then-rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options}")
        atomic_torch_save(checkpoint, path)
