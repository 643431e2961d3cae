"""A dense teacher signal (``loss.distill``): the frozen base with a wide window teaches the student.

The teacher is the same module as the student, seen differently for one no-grad forward
(``teacher_view``): every TTT branch off (``ttt_enabled``), LoRA's update off (``scaling`` 0),
and every self-attention of the temporal transformer - the hybrid and cache_replacement layers'
own short windows included - given the teacher's window (``loss.distill.teacher_window``, null:
the model's own context, 3000 frames for Moshi). What remains is the frozen base with wide
attention, the model the student (short window + memory) should match; no second copy of the
weights is held. Everything is restored exactly when the view closes, so the student's forward
that follows is the one it would have been without a teacher.

The student then matches the teacher at every valid position (``distill_loss``): with
``target=logits`` the KL(teacher || student) of the text and audio distributions at temperature
tau (times tau^2), weighted like Moshi's cross-entropy beside it; with ``target=hidden`` the MSE
between the outputs of the last transformer layer. LoLCATs trains its linear attention against
the softmax attention's outputs the same way.

Every variant can give the teacher view: with its TTT branch off, a hybrid layer is its
attention alone and a cache_replacement layer is the plain local attention whose window is
widened like any other (its memory lag window only shapes what the memory sees).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.modules.lora import LoRALinear
from moshi.modules.transformer import StreamingMultiheadAttention
from torch import nn

from moshi_ttt.config.schema import DISTILL_TARGETS, DistillConfig, LossConfig
from moshi_ttt.training.loss import position_weights


def _self_attentions(model: nn.Module) -> list[StreamingMultiheadAttention]:
    """Every self-attention of the temporal transformer (the depformer is left alone)."""
    return [m for m in model.transformer.modules()
            if isinstance(m, StreamingMultiheadAttention) and not m.cross_attention]


@contextlib.contextmanager
def teacher_view(model: nn.Module, window: int | None = None) -> Iterator[nn.Module]:
    """``model`` as the teacher while the block runs: TTT branches and LoRA off, every temporal
    self-attention over ``window`` frames (None: each one's original context, i.e. Moshi's).
    Restores every switch, scaling and window as it was, whatever the block raises."""
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"loss.distill.teacher_window={window!r} must be a positive integer or null")
    if any(getattr(m, "_streaming_state", None) is not None for m in model.modules()):
        raise RuntimeError("the teacher view is a training forward: it cannot be taken while the model streams")
    switches = [(m, m.ttt_enabled) for m in model.modules() if hasattr(m, "ttt_enabled")]
    loras = [(m, m.scaling) for m in model.modules() if isinstance(m, LoRALinear)]
    attentions = [(m, m.context) for m in _self_attentions(model)]
    try:
        for m, _ in switches:
            m.ttt_enabled = False
        for m, _ in loras:
            m.scaling = 0.0
        for m, _ in attentions:
            m.context = window if window is not None else getattr(m, "moshi_context", m.context)
        yield model
    finally:
        for m, enabled in switches:
            m.ttt_enabled = enabled
        for m, scaling in loras:
            m.scaling = scaling
        for m, context in attentions:
            m.context = context


@contextlib.contextmanager
def capture_hidden(model: nn.Module) -> Iterator[dict]:
    """``box["hidden"]``: the output of the temporal transformer's last layer [B, T, D] (before
    the output norm) in the forward run inside the block."""
    box: dict = {}

    def hook(module, args, output):
        box["hidden"] = output

    handle = model.transformer.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@dataclass
class TeacherOutput:
    """What the student matches: logits (``target=logits``) or last-layer outputs (``hidden``)."""

    logits: torch.Tensor | None = None  # [B, dep_q, T, card]
    text_logits: torch.Tensor | None = None  # [B, 1, T, text_card]
    hidden: torch.Tensor | None = None  # [B, T, D]


@contextlib.contextmanager
def depformer_skipped(model: nn.Module) -> Iterator[nn.Module]:
    """``model``'s forward without its depformer while the block runs: the audio logits come back NaN
    (moshi's own undelaying, on a tensor that costs no compute), the text logits and the temporal
    transformer's outputs exactly as they are. For a forward whose audio distribution nothing reads."""
    own = vars(model).get("forward_depformer_training")

    def skipped(sequence: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        B, _, T = sequence.shape
        return transformer_out.new_full((), float("nan")).expand(B, model.dep_q, T, model.card)

    model.forward_depformer_training = skipped
    try:
        yield model
    finally:
        if own is None:
            del model.forward_depformer_training
        else:
            model.forward_depformer_training = own


def teacher_forward(model: nn.Module, codes: torch.Tensor, cfg: DistillConfig, audio: bool = True) -> TeacherOutput:
    """The teacher's outputs for ``codes`` [B, 17, T], no grad: one forward of the frozen base
    with the teacher's window; nothing of it is kept but its logits (or hidden outputs).
    ``audio=False`` (``loss.audio_weight`` 0: no audio KL): the depformer is skipped and only the text
    logits are kept; the hidden target never needs it (in a tiny model it is ~40% of a forward)."""
    if cfg.target not in DISTILL_TARGETS:
        raise ValueError(f"loss.distill.target={cfg.target!r} must be one of {', '.join(DISTILL_TARGETS)}")
    skip = depformer_skipped(model) if (cfg.target == "hidden" or not audio) else contextlib.nullcontext()
    with torch.no_grad(), teacher_view(model, cfg.teacher_window), skip:
        if cfg.target == "hidden":
            with capture_hidden(model) as box:
                model(codes)
            return TeacherOutput(hidden=box["hidden"])
        out = model(codes)
        return TeacherOutput(logits=out.logits if audio else None, text_logits=out.text_logits)


def _kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
        temperature: float) -> torch.Tensor:
    """Weighted mean over the valid positions of KL(teacher || student) * tau^2 (NaN logits at
    invalid positions never reach it)."""
    log_q = F.log_softmax(student[mask].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * temperature**2
    w = weights[mask]
    return (kl * w).sum() / w.sum().clamp_min(1e-9)


def distill_loss(out, teacher: TeacherOutput, codes: torch.Tensor, cfg: LossConfig,
                 text_padding_ids: tuple[int, ...], audio_offset: int = 1,
                 student_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The student's distance to the teacher (``cfg.distill.target``), scalar float32.

    logits: ``text_weight * KL_text + audio_weight * KL_audio``, each a weighted mean over the
    positions Moshi's loss counts, with its weights (text padding, first codebook); hidden: the
    mean over valid frames of the squared error averaged over channels."""
    distill = cfg.distill
    w = position_weights(out, codes, cfg, text_padding_ids, audio_offset)
    if distill.target == "hidden":
        if teacher.hidden is None or student_hidden is None:
            raise ValueError("loss.distill.target=hidden needs the teacher's and the student's hidden outputs")
        frames = w.text_mask[:, 0]  # [B, T]
        err = (student_hidden.float() - teacher.hidden.float()).pow(2).mean(-1)
        return (err * frames).sum() / frames.sum().clamp_min(1)
    if teacher.text_logits is None or (cfg.audio_weight and teacher.logits is None):
        raise ValueError("loss.distill.target=logits needs the teacher's logits (its audio ones when "
                         "loss.audio_weight > 0)")
    tau = float(distill.temperature)
    loss = cfg.text_weight * _kl(out.text_logits, teacher.text_logits, w.text_mask, w.text_weights, tau)
    if cfg.audio_weight:  # at 0 nothing flows back through the depformer (the same loss)
        loss = loss + cfg.audio_weight * _kl(out.logits, teacher.logits, w.audio_mask, w.audio_weights, tau)
    return loss


def distill_settings(raw: Mapping | DistillConfig | None) -> DistillConfig:
    """``loss.distill`` as a ``DistillConfig`` (a plain dict from a checkpoint or a test, or None)."""
    if isinstance(raw, DistillConfig):
        return raw
    return DistillConfig(**dict(raw or {}))
