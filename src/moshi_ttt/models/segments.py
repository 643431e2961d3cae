"""Conversation boundaries inside a packed training sequence, for TTT state resets.

A packed sequence joins several conversations; with the ``reset_at_boundaries`` packing
policy the TTT memory must start afresh where each one starts, as it would at inference.
The LightningModule sets the batch's ``segments`` ([B, T] ids) around the forward with
``segment_context``; TTT modules read ``current_segments()`` in their training forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

_SEGMENTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("moshi_ttt_segments", default=None)


@contextlib.contextmanager
def segment_context(segments: torch.Tensor | None) -> Iterator[None]:
    token = _SEGMENTS.set(segments)
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def current_segments() -> torch.Tensor | None:
    """[B, T] segment ids when the current forward has boundaries to reset at, else None."""
    seg = _SEGMENTS.get()
    if seg is None or not bool((seg[:, 1:] != seg[:, :-1]).any()):
        return None
    return seg


def spans(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of equal ids in a [T] row."""
    change = (row[1:] != row[:-1]).nonzero().flatten().add(1).tolist()
    bounds = [0, *change, row.shape[0]]
    return list(zip(bounds[:-1], bounds[1:]))


def per_segment(x: torch.Tensor, segments: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` ([1, t, ...] -> [1, t, ...], fresh state each call) to every segment of
    every sample of ``x`` [B, T, ...] and reassemble: the memory restarts at each boundary."""
    if segments.shape[:2] != x.shape[:2]:
        raise ValueError(f"segments {tuple(segments.shape)} do not match the sequence {tuple(x.shape[:2])}")
    rows = []
    for b in range(x.shape[0]):
        rows.append(torch.cat([fn(x[b : b + 1, s:e]) for s, e in spans(segments[b])], dim=1))
    return torch.cat(rows, dim=0)
