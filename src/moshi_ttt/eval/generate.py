"""Streaming generation with moshi's LMGen for minutes, tracking the four collapse phases.

A held-out conversation gives the prompt: for its first ``prompt_frames`` frames Moshi's text
is forced (through LMGen's ``on_text_logits_hook``: every other logit set to -inf) and Moshi's
audio is replaced (``depformer_replace_tokens``); from then on the model runs free. The user
streams come from the same conversation while it lasts (``user="sample"``) or are silent after
the prompt (``user="silence"``); silence is moshi's "no input" token (-1: a zero embedding)
unless ``silence_tokens`` gives 8 codes (e.g. Mimi's codes of silent audio).

Every frame records Moshi's text and audio tokens and the entropies of the model's predictive
distributions (text: the logits LMGen samples from; audio: the depformer's per-codebook logits,
read by forward hooks on ``lm.linears``), normalised by log(vocabulary size). Every window of
``window_frames`` frames (default 10 s) gets repetition/diversity/loop statistics and a phase
(``moshi_ttt.eval.phases``). CUDA graphs are disabled while tracking (the hooks run every step).

User alignment: ``LMModel.forward`` (training) gives the model user frame ``t - 1`` together
with Moshi's frame ``t - 1`` when it predicts frame ``t``; LMGen, fed user frame ``s`` at step
``s``, would show the model the user's current frame one step earlier than training did. With
``user_alignment="training"`` (default) step ``s`` is fed user frame ``s - 1``, so the
teacher-forced prompt computes exactly the training forward's predictions; ``"live"`` feeds
frame ``s`` (as a live Moshi server does).

Alignment of the outputs: LMGen's step ``s`` samples the text of frame ``s`` and codebook ``k`` of frame
``s - delay_k``; it returns frame ``s - max_delay``. The prompt's last delayed codebooks (frame
``P - 1`` of codebooks with delay 1) are generated, not forced: LMGen replaces all or none of a
step's audio tokens.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.eval.phases import (
    DEFAULT_THRESHOLDS,
    PHASES,
    SEVERITY,
    SILENT,
    PhaseThresholds,
    classify,
    token_stats,
)
from moshi_ttt.eval.samples import model_device

logger = logging.getLogger(__name__)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dimension, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def track_windows(text_tokens: Sequence[int], text_entropy: Sequence[float], audio_tokens: Sequence[Sequence[int]],
                  audio_entropy: Sequence[float], window_frames: int = 125, prompt_frames: int = 0,
                  ignore_text: Sequence[int] = (0, 3), thresholds: PhaseThresholds = DEFAULT_THRESHOLDS,
                  frame_rate: float = FRAME_RATE, text_pieces: Callable[[int], str] | None = None) -> list[dict]:
    """Per-window statistics and phase of a token timeline (``text_entropy``/``audio_entropy``:
    per-frame normalised entropies, NaN where unknown; ``audio_tokens``: [8][frames]; content text
    tokens are those not in ``ignore_text``, the padding ids)."""
    if window_frames < 1:
        raise ValueError(f"window_frames must be >= 1, got {window_frames}")
    T = len(text_tokens)
    ignore = set(int(i) for i in ignore_text)
    windows = []
    for a in range(0, T, window_frames):
        b = min(T, a + window_frames)
        frames = range(a, b)
        content = [int(text_tokens[t]) for t in frames if int(text_tokens[t]) not in ignore and text_tokens[t] >= 0]
        word_frames = [t for t in frames if int(text_tokens[t]) not in ignore and text_tokens[t] >= 0]
        stats = token_stats(content, thresholds)
        word_entropy = _nanmean(text_entropy[t] for t in word_frames)
        semantic = [int(audio_tokens[0][t]) for t in frames] if len(audio_tokens) else []
        audio = token_stats(semantic, thresholds)
        row = {
            "window": len(windows), "start_frame": a, "end_frame": b, "start_s": a / frame_rate,
            "end_s": b / frame_rate, "teacher_forced": max(0, min(b, prompt_frames) - a) / (b - a),
            **stats,
            "text_entropy": _nanmean(text_entropy[t] for t in frames),
            "word_entropy": word_entropy,
            "audio_entropy": _nanmean(audio_entropy[t] for t in frames),
            "audio_distinct_1": audio["distinct_1"],
            "audio_repetition_rate": audio["repetition_rate"],
            "audio_loop_coverage": audio["loop_coverage"],
        }
        entropy = word_entropy if not math.isnan(word_entropy) else row["text_entropy"]
        row["phase"] = classify(stats, entropy, thresholds)
        row["content_tokens"] = content
        if text_pieces is not None:
            row["text"] = "".join(text_pieces(t) for t in content).replace("\u2581", " ").strip()
        windows.append(row)
    return windows


@dataclass
class Timeline:
    """What :func:`generate_and_track` generated and measured (JSON/CSV/PNG writers included)."""

    num_frames: int
    prompt_frames: int
    window_frames: int
    text_tokens: list[int]
    audio_tokens: list[list[int]]
    text_entropy: list[float]
    audio_entropy: list[float]
    windows: list[dict]
    frame_rate: float = FRAME_RATE
    thresholds: dict = field(default_factory=DEFAULT_THRESHOLDS.to_dict)
    config: dict = field(default_factory=dict)

    def generated_windows(self) -> list[dict]:
        """Windows that start after the prompt (all of them when none does)."""
        free = [w for w in self.windows if w["start_frame"] >= self.prompt_frames]
        return free or [w for w in self.windows if w["teacher_forced"] < 1.0] or self.windows

    def summary(self) -> dict:
        gen = self.generated_windows()
        counts = Counter(w["phase"] for w in gen)
        onsets = {p: next((w["start_s"] for w in gen if w["phase"] == p), None) for p in (*PHASES, SILENT)}
        judged = [w for w in gen if w["phase"] != SILENT]
        worst = max(judged, key=lambda w: SEVERITY[w["phase"]])["phase"] if judged else SILENT
        return {
            "seconds": self.num_frames / self.frame_rate, "prompt_seconds": self.prompt_frames / self.frame_rate,
            "windows": len(gen), "window_seconds": self.window_frames / self.frame_rate,
            "phase_counts": {p: counts.get(p, 0) for p in (*PHASES, SILENT)},
            "onset_s": onsets, "worst_phase": worst, "final_phase": gen[-1]["phase"] if gen else None,
            "mean_text_entropy": _nanmean(w["text_entropy"] for w in gen),
            "mean_audio_entropy": _nanmean(w["audio_entropy"] for w in gen),
            "mean_repetition_rate": _nanmean(w["repetition_rate"] for w in gen if w["tokens"]),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "num_frames": self.num_frames, "prompt_frames": self.prompt_frames,
                "window_frames": self.window_frames, "frame_rate": self.frame_rate, "thresholds": self.thresholds,
                "config": self.config, "windows": self.windows, "text_tokens": self.text_tokens,
                "audio_tokens": self.audio_tokens, "text_entropy": self.text_entropy,
                "audio_entropy": self.audio_entropy}

    def write_json(self, path) -> Path:
        from moshi_ttt.eval.position_loss import _json_safe

        path = Path(path)
        path.write_text(json.dumps(_json_safe(self.to_dict())))
        return path

    CSV_FIELDS = ("window", "start_frame", "end_frame", "start_s", "end_s", "teacher_forced", "phase", "tokens",
                  "unique", "distinct_1", "distinct_2", "diversity", "repetition_rate", "longest_loop", "loop_period",
                  "loop_coverage", "text_entropy", "word_entropy", "audio_entropy", "audio_distinct_1",
                  "audio_repetition_rate", "audio_loop_coverage", "text")

    def write_csv(self, path) -> Path:
        from moshi_ttt.eval.position_loss import write_csv_rows

        return write_csv_rows(path, self.CSV_FIELDS, self.windows)


@torch.no_grad()
def generate_and_track(model, prompt_codes: torch.Tensor, num_frames: int, prompt_frames: int | None = None,
                       window_frames: int = 125, temp: float = 0.8, temp_text: float = 0.7, top_k: int = 250,
                       top_k_text: int = 25, use_sampling: bool = True, seed: int = 0, user: str = "sample",
                       silence_tokens: Sequence[int] | None = None, user_alignment: str = "training",
                       thresholds: PhaseThresholds = DEFAULT_THRESHOLDS,
                       text_pieces: Callable[[int], str] | None = None, log_every: int = 0) -> Timeline:
    """Generate ``num_frames`` frames with LMGen, teacher-forcing the first ``prompt_frames`` frames
    of ``prompt_codes`` ([17, T]; default: all of its valid frames, up to ``num_frames``), and
    track entropy, repetition and the collapse phase per window (see the module docstring)."""
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_cuda_graph

    if user_alignment not in ("training", "live"):
        raise ValueError(f"user_alignment must be 'training' or 'live', got {user_alignment!r}")
    lag = 1 if user_alignment == "training" else 0
    if user not in ("sample", "silence"):
        raise ValueError(f"user must be 'sample' or 'silence', got {user!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    prompt_codes = torch.as_tensor(prompt_codes, dtype=torch.long).cpu()
    if prompt_codes.dim() != 2 or prompt_codes.shape[0] != model.num_codebooks:
        raise ValueError(f"prompt_codes must be [{model.num_codebooks}, T], got {tuple(prompt_codes.shape)}")
    dep_q = model.dep_q
    own = prompt_codes[: 1 + dep_q]
    valid = int((own >= 0).all(0).long().cumprod(0).sum())  # frames before the first padded one
    P = valid if prompt_frames is None else int(prompt_frames)
    if not 0 <= P <= valid:
        raise ValueError(f"prompt_frames={P}: the prompt has {valid} valid frame(s)")
    P = min(P, num_frames)
    if silence_tokens is not None and len(silence_tokens) != model.n_q - dep_q:
        raise ValueError(f"silence_tokens needs {model.n_q - dep_q} codes, got {len(silence_tokens)}")
    silence = torch.tensor(list(silence_tokens) if silence_tokens is not None else [model.zero_token_id]
                           * (model.n_q - dep_q), dtype=torch.long)

    model.eval()
    device = model_device(model)
    delays = list(model.delays)
    max_delay = max(delays)
    steps = num_frames + max_delay
    text_card, card = int(model.text_card), int(model.card)
    text_entropy = [float("nan")] * steps
    audio_entropy_cb = [[float("nan")] * steps for _ in range(dep_q)]
    state = {"step": 0}

    def on_text_logits(logits: torch.Tensor) -> None:
        s = state["step"]
        text_entropy[s] = float(_entropy(logits[0, 0, -1])) / math.log(text_card)
        if s < P:  # teacher forcing: only the prompt's token can be sampled
            target = int(prompt_codes[0, s])
            forced = torch.full_like(logits, float("-inf"))
            forced[..., target] = 0.0
            logits.copy_(forced)

    def depformer_hook(k: int):
        def hook(module, inputs, output) -> None:
            frame = state["step"] - delays[1 + k]
            if 0 <= frame < steps:
                audio_entropy_cb[k][frame] = float(_entropy(output.reshape(-1, output.shape[-1])[0])) / math.log(card)
        return hook

    handles = [lin.register_forward_hook(depformer_hook(k)) for k, lin in enumerate(model.linears)]
    gen = LMGen(model, use_sampling=use_sampling, temp=temp, temp_text=temp_text, top_k=top_k,
                top_k_text=top_k_text, on_text_logits_hook=on_text_logits)
    text_out: list[int] = []
    audio_out: list[list[int]] = [[] for _ in range(dep_q)]
    fork_devices = [device] if device.type == "cuda" else []
    try:
        # CUDA graphs off: a replayed graph would skip the depformer hooks (and a sync in a hook
        # cannot run while a graph is being captured).
        with torch.random.fork_rng(devices=fork_devices), no_cuda_graph(), gen.streaming(1):
            torch.manual_seed(seed)
            for s in range(steps):
                state["step"] = s
                u = s - lag  # the user frame that enters the model with this step's input
                if 0 <= u < prompt_codes.shape[1] and (user == "sample" or u < P):
                    user_tokens = prompt_codes[1 + dep_q :, u]
                else:
                    user_tokens = silence
                replace = None
                if s < P:
                    # codebook k of this step is frame s - delay_k (before frame 0: ignored by LMGen)
                    replace = torch.tensor([int(prompt_codes[1 + k, s - delays[1 + k]]) if s >= delays[1 + k] else 0
                                            for k in range(dep_q)], dtype=torch.long)
                    replace = replace.view(1, dep_q, 1).to(device)
                out = gen.step(user_tokens.view(1, -1, 1).to(device), depformer_replace_tokens=replace)
                if out is not None:
                    text_out.append(int(out[0, 0, 0]))
                    for k in range(dep_q):
                        audio_out[k].append(int(out[0, 1 + k, 0]))
                if log_every and (s + 1) % log_every == 0:
                    logger.info("generated %d / %d frames", s + 1, steps)
    finally:
        for h in handles:
            h.remove()
    text_out, audio_out = text_out[:num_frames], [a[:num_frames] for a in audio_out]
    audio_entropy = [_nanmean(audio_entropy_cb[k][t] for k in range(dep_q)) for t in range(num_frames)]
    pads = (model.text_padding_token_id, model.end_of_text_padding_id)
    windows = track_windows(text_out, text_entropy[:num_frames], audio_out, audio_entropy, window_frames, P, pads,
                            thresholds, FRAME_RATE, text_pieces)
    config = {"temp": temp, "temp_text": temp_text, "top_k": top_k, "top_k_text": top_k_text,
              "use_sampling": use_sampling, "seed": seed, "user": user, "text_card": text_card, "card": card,
              "silence_tokens": silence.tolist(), "user_alignment": user_alignment, "text_padding_ids": list(pads)}
    return Timeline(num_frames, P, window_frames, text_out, audio_out, text_entropy[:num_frames], audio_entropy,
                    windows, FRAME_RATE, thresholds.to_dict(), config)
