"""Per-sample TTT state: fast weights plus the tokens not yet written into them.

The state is what lets a stream be processed in chunks of any size (down to one frame) with
exactly the outputs of the whole sequence at once: it holds the committed fast weights and
the keys/values/learning rates of the tokens whose mini-batch has not been written yet
(the current partial mini-batch, plus the lagged ones of a memory read at a lag).

Everything is per sample along dim 0, so samples never mix, and a subset can be reset when
its conversation ends. Tensors are never modified in place: every method rebinds fields,
so a state can sit in an autograd graph (truncated BPTT) and be detached between windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class TTTState:
    """Fast-weight memory of a batch of streams.

    weights:   fast weights, name -> [B, H, ...] (fp32 whatever the autocast dtype).
    init:      the learned initial weights, name -> [H, ...]: live references to the layer's
               parameters, so a reset sample starts from them and gradients reach them.
    buf_k, buf_v: [B, H, L, d] unwritten keys/values, valid up to ``lengths[i]`` (rest zero).
    buf_lr:    [B, H, L] their per-token learning rates.
    buf_decay: [B, H, L] their log-decays (the delta rule with ``decay``), else None.
    lengths:   unwritten tokens per sample; the buffer always starts on a mini-batch boundary.
    positions: tokens seen per sample since its last reset (for error messages and logging).
    """

    weights: dict[str, Tensor]
    init: dict[str, Tensor]
    buf_k: Tensor
    buf_v: Tensor
    buf_lr: Tensor
    lengths: tuple[int, ...]
    positions: tuple[int, ...]
    buf_decay: Tensor | None = None

    @classmethod
    def fresh(
        cls, init: dict[str, Tensor], batch_size: int, head_dim: int, device=None, dtype=torch.float32,
        decay: bool = False,
    ) -> TTTState:
        """A state whose samples all start from ``init`` with nothing buffered (fp32 unless fp64);
        ``decay``: it buffers log-decays too."""
        device = device if device is not None else next(iter(init.values())).device
        weights = {k: _expand(v.to(device=device, dtype=dtype), batch_size) for k, v in init.items()}
        num_heads = next(iter(init.values())).shape[0]
        empty = torch.zeros(batch_size, num_heads, 0, head_dim, device=device, dtype=dtype)
        return cls(
            weights=weights,
            init=dict(init),
            buf_k=empty,
            buf_v=empty,
            buf_lr=empty[..., 0],
            lengths=(0,) * batch_size,
            positions=(0,) * batch_size,
            buf_decay=empty[..., 0] if decay else None,
        )

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def device(self) -> torch.device:
        return self.buf_k.device

    def reset(self, mask: Tensor | Sequence[bool]) -> TTTState:
        """Reset the samples where ``mask`` [B] is true to the learned initial weights; returns self."""
        flags = [bool(m) for m in (mask.tolist() if isinstance(mask, Tensor) else mask)]
        if len(flags) != self.batch_size:
            raise ValueError(
                f"reset mask has {len(flags)} entries for a state of batch size {self.batch_size}"
            )
        if not any(flags):
            return self
        sel = torch.tensor(flags, device=self.device)
        weights = {}
        for k, w in self.weights.items():
            init = _expand(self.init[k].to(device=w.device, dtype=w.dtype), self.batch_size)
            weights[k] = torch.where(sel.view(-1, *([1] * (w.dim() - 1))), init, w)
        self.weights = weights
        self.lengths = tuple(0 if f else n for f, n in zip(flags, self.lengths))
        self.positions = tuple(0 if f else p for f, p in zip(flags, self.positions))
        self.buf_k, self.buf_v, self.buf_lr, self.buf_decay = _trim(
            self.buf_k, self.buf_v, self.buf_lr, self.buf_decay, self.lengths)
        return self

    def select(self, index: Sequence[int] | Tensor) -> TTTState:
        """The state of the samples ``index`` (in that order)."""
        idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        t = torch.tensor(idx, device=self.device, dtype=torch.long)
        lengths = tuple(self.lengths[i] for i in idx)
        buf = _trim(
            self.buf_k.index_select(0, t),
            self.buf_v.index_select(0, t),
            self.buf_lr.index_select(0, t),
            None if self.buf_decay is None else self.buf_decay.index_select(0, t),
            lengths,
        )
        return replace(
            self,
            weights={k: w.index_select(0, t.to(w.device)) for k, w in self.weights.items()},
            buf_k=buf[0],
            buf_v=buf[1],
            buf_lr=buf[2],
            buf_decay=buf[3],
            lengths=lengths,
            positions=tuple(self.positions[i] for i in idx),
        )

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> TTTState:
        """``state[i]``, ``state[1:3]``, ``state[[0, 2]]``, ``state[bool_mask]``: a per-sample view."""
        if isinstance(index, int):
            index = [index]
        elif isinstance(index, slice):
            index = range(self.batch_size)[index]
        elif isinstance(index, Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return self.select(index)

    @staticmethod
    def cat(states: Sequence[TTTState]) -> TTTState:
        """Concatenate states along the batch (buffers padded to the longest)."""
        if len(states) == 1:
            return states[0]
        width = max(s.buf_k.shape[2] for s in states)
        return replace(
            states[0],
            weights={k: torch.cat([s.weights[k] for s in states]) for k in states[0].weights},
            buf_k=torch.cat([_pad_tokens(s.buf_k, width) for s in states]),
            buf_v=torch.cat([_pad_tokens(s.buf_v, width) for s in states]),
            buf_lr=torch.cat([_pad_tokens(s.buf_lr, width) for s in states]),
            buf_decay=(None if states[0].buf_decay is None
                       else torch.cat([_pad_tokens(s.buf_decay, width) for s in states])),
            lengths=sum((s.lengths for s in states), ()),
            positions=sum((s.positions for s in states), ()),
        )

    def _map(self, fn) -> TTTState:
        return replace(
            self,
            weights={k: fn(w) for k, w in self.weights.items()},
            buf_k=fn(self.buf_k),
            buf_v=fn(self.buf_v),
            buf_lr=fn(self.buf_lr),
            buf_decay=None if self.buf_decay is None else fn(self.buf_decay),
        )

    def detach(self) -> TTTState:
        """Cut the autograd history (between truncated-BPTT windows); init stays the live parameters."""
        return self._map(Tensor.detach)

    def clone(self) -> TTTState:
        """An independent copy of the per-sample tensors."""
        return self._map(Tensor.clone)

    def to(self, device) -> TTTState:
        """The same state on ``device``."""
        moved = self._map(lambda t: t.to(device))
        moved.init = {k: v.to(device) for k, v in self.init.items()}
        return moved


def _expand(w: Tensor, batch_size: int) -> Tensor:
    return w.unsqueeze(0).expand(batch_size, *w.shape)


def _pad_tokens(x: Tensor, width: int) -> Tensor:
    """Right-pad the token axis (dim 2 of [B, H, L, ...]) with zeros up to ``width``."""
    missing = width - x.shape[2]
    if missing == 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 3) + [0, missing])


def _trim(buf_k: Tensor, buf_v: Tensor, buf_lr: Tensor, buf_decay: Tensor | None, lengths: tuple[int, ...]):
    """Zero the slots past each sample's length and drop columns no sample uses."""
    width = max(lengths, default=0)
    buf_k, buf_v, buf_lr = buf_k[:, :, :width], buf_v[:, :, :width], buf_lr[:, :, :width]
    buf_decay = None if buf_decay is None else buf_decay[:, :, :width]
    if width and min(lengths) < width:
        valid = torch.arange(width, device=buf_k.device) < torch.tensor(lengths, device=buf_k.device)[:, None]
        valid = valid[:, None, :]
        buf_k = torch.where(valid[..., None], buf_k, 0.0)
        buf_v = torch.where(valid[..., None], buf_v, 0.0)
        buf_lr = torch.where(valid, buf_lr, 0.0)
        buf_decay = None if buf_decay is None else torch.where(valid, buf_decay, 0.0)
    return buf_k, buf_v, buf_lr, buf_decay
