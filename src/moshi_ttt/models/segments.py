"""Conversation boundaries inside a packed training sequence, for TTT state resets.

A packed sequence joins several conversations; with the ``reset_at_boundaries`` packing
policy the TTT memory must start afresh where each one starts, as it would at inference.

The boundaries are *bound* for a whole training step, forward and backward, because the
forward is run twice when activations are checkpointed: once in the step and again inside
``loss.backward()``, where moshi's ``torch.utils.checkpoint`` recomputes each layer (and, on
CUDA, on the autograd engine's device threads). A context variable set around the forward is
gone by then, so the recomputation took the unsegmented path and saved a different set of
tensors (``CheckpointError``). The binding is therefore plain process state that every thread
sees: the LightningModule binds a batch's ``segments`` ([B, T] ids) before its forward and
releases them after its backward (``on_after_backward``) or after a forward-only step.
TTT modules read ``current_segments()`` in their training forward (never while streaming).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

_BOUND: list[torch.Tensor | None] = [None]


def bind_segments(segments: torch.Tensor | None) -> None:
    """Make ``segments`` ([B, T] ids, or None) the boundaries of every forward and recomputation
    until ``release_segments()``: call it before a training step's forward."""
    if segments is not None and segments.dim() != 2:
        raise ValueError(f"segments must be [B, T] ids, got shape {tuple(segments.shape)}")
    _BOUND[0] = segments


def release_segments() -> None:
    """The step (and its backward) is over: later forwards see no boundaries."""
    _BOUND[0] = None


@contextlib.contextmanager
def segment_context(segments: torch.Tensor | None) -> Iterator[None]:
    """Boundaries for a forward-only block (evaluation, validation); a training step whose
    backward recomputes checkpointed layers must use ``bind_segments`` instead."""
    previous = _BOUND[0]
    bind_segments(segments)
    try:
        yield
    finally:
        _BOUND[0] = previous


def current_segments() -> torch.Tensor | None:
    """[B, T] segment ids when the current forward has boundaries to reset at, else None."""
    seg = _BOUND[0]
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
