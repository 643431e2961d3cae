"""Teacher-forced pass over a long stream in chunks, at linear cost, recording what the
long-stream checks read: per-position entropies and argmax tokens, norm inputs and residual
RMS of every layer, and the TTT modules' health (fast weights, inner lr) after every chunk.

The temporal transformer runs in moshi's streaming mode (ring KV caches, TTT states carried
across chunks). A chunk of C frames needs its first query's whole window in the cache, so each
ring is enlarged to ``context + C - 1`` slots while the attention mask keeps ``context``: the
outputs equal the full training forward's (tested), for any chunk size. The depformer (audio
logits) runs per chunk outside streaming, as in training.

Padding (frames of -1, after a conversation shorter than the stream) is never a finding:
``without_padding`` cuts the stream where the first sequence ends, so padding is not streamed
(the TTT states and batch-wide statistics see real frames only), and ``StreamRecord.mean``
averages only the frames marked valid in case a caller streams padding anyway.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from moshi.models.lm import _delay_sequence
from moshi.modules.transformer import RingKVCache

from moshi_ttt.diagnostics.layout import TTTModule, ttt_modules
from moshi_ttt.eval.generate import _entropy
from moshi_ttt.eval.samples import model_device
from moshi_ttt.models.variants import base_layer

logger = logging.getLogger(__name__)


def valid_frames(codes: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: frames that hold a conversation (a text token; padding is -1 in every codebook)."""
    return codes[:, 0] >= 0


def without_padding(codes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(codes cut to the frames where every sequence still has tokens, frames cut): a stream never
    runs on padding, whose zero embeddings would otherwise count as conversation."""
    valid = valid_frames(codes).all(0)
    n = int(valid.long().cumprod(0).sum())
    if n == 0:
        raise ValueError(f"codes of shape {tuple(codes.shape)}: a sequence starts with padding (-1), nothing to stream")
    return codes[..., :n], int(codes.shape[-1]) - n


@dataclass
class Chunk:
    start: int
    end: int
    hidden: torch.Tensor  # [B, C, dim] transformer output (after out_norm)
    text_logits: torch.Tensor  # [B, C, text_card], predicts codes[:, 0, start:end]
    audio_logits: torch.Tensor | None  # [B, dep_q, C, card]: step s predicts the audio of step s


def delayed_input(model, codes: torch.Tensor) -> torch.Tensor:
    """[B, K, T+1]: the initial token then the delayed codes, as ``LMModel.forward`` builds them."""
    B = codes.shape[0]
    initial = model._get_initial_token().expand(B, -1, -1)
    return torch.cat([initial, _delay_sequence(model.delays, codes, initial)], dim=2)


def _enlarge_caches(module: torch.nn.Module, extra: int) -> int:
    """Give every ring KV cache ``extra`` more slots (a fresh, empty one); returns how many."""
    n = 0
    for m in module.modules():
        state = getattr(m, "_streaming_state", None)
        kv = getattr(state, "kv_cache", None)
        if isinstance(kv, RingKVCache) and extra > 0:
            _, B, H, cap, D = kv.cache.shape
            state.kv_cache = RingKVCache(B, H, D, cap + extra, kv.respect_exec_mask, kv.cache.device, kv.cache.dtype)
            n += 1
    return n


@contextlib.contextmanager
def streaming_transformer(model, batch_size: int, chunk_frames: int):
    """The temporal transformer in streaming mode, exact for chunks of ``chunk_frames`` frames."""
    for i, layer in enumerate(model.transformer.layers):
        attn = base_layer(layer).self_attn
        if not getattr(layer, "skip_self_attn", False) and attn.context is None:
            raise ValueError(f"layer{i}: unbounded attention (context=None) cannot stream; set a finite "
                             "ttt.attention_window or model context")
    with model.transformer.streaming(batch_size):
        _enlarge_caches(model.transformer, chunk_frames - 1)
        yield


def iter_chunks(model, codes: torch.Tensor, chunk_frames: int, audio: bool = True,
                on_start=None) -> Iterator[Chunk]:
    """Teacher-forced outputs of ``codes`` [B, 17, T] chunk by chunk (no gradient); ``on_start(start,
    end)`` is called before each chunk's forward (for hooks that record by position)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    device = model_device(model)
    codes = codes.to(device)
    B, _, T = codes.shape
    delayed = delayed_input(model, codes)
    with torch.no_grad(), streaming_transformer(model, B, chunk_frames):
        for start in range(0, T, chunk_frames):
            end = min(T, start + chunk_frames)
            if on_start is not None:
                on_start(start, end)
            hidden, text = model.forward_text(delayed[:, :, start:end])
            audio_logits = None
            if audio and model.depformer is not None:
                audio_logits = model.forward_depformer_training(delayed[:, :, start + 1 : end + 1], hidden)
            yield Chunk(start, end, hidden, text[:, 0], audio_logits)


@dataclass
class StreamRecord:
    """Everything recorded on one stream (numpy, batch kept: [B, T] per position)."""

    frames: int
    chunk_frames: int
    valid: np.ndarray  # [B, T] bool: frames with a text token (shorter samples are padded with -1)
    text_entropy: np.ndarray  # [B, T] normalised by log(text_card)
    audio_entropy: np.ndarray  # [B, T] mean over the codebooks, normalised by log(card); NaN if skipped
    text_argmax: np.ndarray  # [B, T] int
    audio_argmax: np.ndarray  # [B, T] int, first (semantic) codebook; -1 if skipped
    residual_rms: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [B, T] RMS of its input
    norm_inputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "layer3.norm1" -> rms/mean/std
    ttt_chunks: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # layer -> stat -> per chunk
    ttt_initial: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> stats of the init weights
    ttt_info: dict[str, dict] = field(default_factory=dict)  # layer -> kind, norm scale, eta_max, mini-batch

    def mean(self, x: np.ndarray) -> np.ndarray:
        """[B, T] -> [T], averaged over the samples where the frame is valid (NaN where none is).

        Padded frames are left out; a NaN/Inf at a valid frame stays in (that is a finding)."""
        count = self.valid.sum(0)
        total = np.where(self.valid, np.asarray(x, dtype=np.float64), 0.0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)


class _PositionHooks:
    """Forward pre-hooks that write per-position statistics of a module's input into [B, T] arrays."""

    def __init__(self, B: int, T: int):
        self.B, self.T = B, T
        self.where = (0, 0)
        self.handles = []

    def at(self, start: int, end: int) -> None:
        self.where = (start, end)

    def _arrays(self, n: int) -> list[np.ndarray]:
        return [np.full((self.B, self.T), np.nan, dtype=np.float32) for _ in range(n)]

    def residual(self, module, out: dict, key: str) -> None:
        arr = out[key] = self._arrays(1)[0]

        def hook(_mod, args):
            x = args[0].detach().float()
            a, b = self.where
            arr[:, a:b] = x.pow(2).mean(-1).sqrt().cpu().numpy()

        self.handles.append(module.register_forward_pre_hook(hook))

    def norm(self, module, out: dict, key: str) -> None:
        rms, mean, std = self._arrays(3)
        out[key] = {"rms": rms, "mean": mean, "std": std}

        def hook(_mod, args):
            x = args[0].detach().float()
            a, b = self.where
            rms[:, a:b] = x.pow(2).mean(-1).sqrt().cpu().numpy()
            mean[:, a:b] = x.mean(-1).cpu().numpy()
            std[:, a:b] = x.std(-1).cpu().numpy()

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _ttt_info(t: TTTModule) -> dict:
    c = t.config
    return {"kind": t.kind, "norm_scale": t.norm_scale, "eta_max_config": float(c.eta_max),
            "eta_min_config": float(c.eta_min), "mini_batch_size": int(t.memory.mini_batch_size),
            "head_dim": int(t.memory.head_dim), "inner": c.inner}


@contextlib.contextmanager
def nan_guard_off(modules: list[TTTModule]):
    """Let a diverging memory run on (NaN/Inf stats are what the health check reports), then restore."""
    configs = [m.config for m in modules]  # the memories' settings (the TTT layer's own, where it has one)
    saved = [c.nan_guard for c in configs]
    try:
        for c in configs:
            c.nan_guard = False
        yield
    finally:
        for c, s in zip(configs, saved):
            c.nan_guard = s


def default_chunk_frames(model) -> int:
    """The smallest mini-batch of a mini-batch-GD memory (one health sample per mini-batch), else
    16: a delta-rule memory writes per token and streams exactly in chunks of any size."""
    return min((int(m.memory.mini_batch_size) for m in ttt_modules(model) if m.memory.rule == "minibatch_gd"),
               default=16)


def record_stream(model, codes: torch.Tensor, chunk_frames: int | None = None, audio: bool = True,
                  log_every: int = 0) -> StreamRecord:
    """One teacher-forced streaming pass over ``codes`` [B, 17, T] recording a StreamRecord.

    ``chunk_frames`` defaults to ``default_chunk_frames``."""
    if codes.dim() != 3 or codes.shape[1] != model.num_codebooks:
        raise ValueError(f"codes must be [B, {model.num_codebooks}, T], got {tuple(codes.shape)}")
    mods = ttt_modules(model)
    if chunk_frames is None:
        chunk_frames = default_chunk_frames(model)
    B, _, T = codes.shape
    hooks = _PositionHooks(B, T)
    residual: dict = {}
    norms: dict = {}
    for i, layer in enumerate(model.transformer.layers):
        inner = base_layer(layer)
        hooks.residual(layer, residual, f"layer{i}")
        for norm_name in ("norm1", "norm2"):
            mod = getattr(inner, norm_name, None)
            if mod is not None:
                hooks.norm(mod, norms, f"layer{i}.{norm_name}")
    if getattr(model, "out_norm", None) is not None:
        hooks.norm(model.out_norm, norms, "out_norm")
    rec = StreamRecord(
        frames=T, chunk_frames=chunk_frames, valid=valid_frames(codes).cpu().numpy(),
        text_entropy=np.full((B, T), np.nan, np.float32), audio_entropy=np.full((B, T), np.nan, np.float32),
        text_argmax=np.full((B, T), -1, np.int64), audio_argmax=np.full((B, T), -1, np.int64),
        residual_rms=residual, norm_inputs=norms)
    for m in mods:
        with torch.no_grad():
            rec.ttt_initial[m.name] = {k: float(v) for k, v in m.memory.weight_stats(m.fresh_state(1)).items()}
        rec.ttt_info[m.name] = _ttt_info(m)
        rec.ttt_chunks[m.name] = {"end_frame": []}
    log_text, log_card = math.log(model.text_card), math.log(model.card)
    try:
        with nan_guard_off(mods):
            for ch in iter_chunks(model, codes, chunk_frames, audio, on_start=hooks.at):
                a, b = ch.start, ch.end
                rec.text_entropy[:, a:b] = (_entropy(ch.text_logits) / log_text).cpu().numpy()
                rec.text_argmax[:, a:b] = ch.text_logits.argmax(-1).cpu().numpy()
                if ch.audio_logits is not None:
                    rec.audio_entropy[:, a:b] = (_entropy(ch.audio_logits).mean(1) / log_card).cpu().numpy()
                    rec.audio_argmax[:, a:b] = ch.audio_logits[:, 0].argmax(-1).cpu().numpy()
                for m in mods:
                    row = rec.ttt_chunks[m.name]
                    row["end_frame"].append(b)
                    for k, v in m.module.health().items():
                        row.setdefault(k, []).append(v)
                if log_every and (b // log_every) != (a // log_every):
                    logger.info("streamed %d / %d frames", b, T)
    finally:
        hooks.remove()
    return rec
