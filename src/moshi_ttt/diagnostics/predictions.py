"""Entropy of the text and audio predictions by position, and token repetition / distinct-n of
the predicted (argmax, teacher-forced) text over time, per window of the stream.

Entropies are normalised by log(vocabulary) (0 = certain, 1 = uniform), as in ``moshi_ttt.eval``.
Text statistics use the content tokens only (padding ids dropped) and ``moshi_ttt.eval.phases``'s
``repetition_rate`` / ``distinct_n``; the audio ones use the first (semantic) codebook.
"""

from __future__ import annotations

import numpy as np

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.diagnostics.findings import CheckResult, bucket, seconds
from moshi_ttt.diagnostics.thresholds import DEFAULTS, Thresholds
from moshi_ttt.eval.phases import distinct_n, moving_ttr, repetition_rate


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def window_stats(text_entropy: np.ndarray, audio_entropy: np.ndarray, text_tokens: np.ndarray,
                 audio_tokens: np.ndarray, valid: np.ndarray, window_frames: int,
                 ignore_text=(), ngram: int = 3) -> list[dict]:
    """One row per window of ``window_frames`` frames. Entropies are [T] (already averaged over
    samples); tokens and ``valid`` are [B, T] (statistics per sample, then averaged)."""
    if window_frames < 1:
        raise ValueError(f"window_frames must be >= 1, got {window_frames}")
    text_tokens, audio_tokens, valid = np.atleast_2d(text_tokens), np.atleast_2d(audio_tokens), np.atleast_2d(valid)
    ignore = {int(i) for i in ignore_text}
    T = text_tokens.shape[1]
    rows = []
    for a in range(0, T, window_frames):
        b = min(T, a + window_frames)
        rep, d1, d2, div, n_tok, arep, ad1 = [], [], [], [], [], [], []
        for s in range(text_tokens.shape[0]):
            keep = valid[s, a:b]
            content = [int(t) for t in text_tokens[s, a:b][keep] if int(t) not in ignore and t >= 0]
            n_tok.append(len(content))
            if content:
                rep.append(repetition_rate(content, ngram))
                d1.append(distinct_n(content, 1))
                d2.append(distinct_n(content, 2))
                div.append(moving_ttr(content))
            audio = [int(t) for t in audio_tokens[s, a:b][keep] if t >= 0]
            if audio:
                arep.append(repetition_rate(audio, ngram))
                ad1.append(distinct_n(audio, 1))
        rows.append({"start_frame": a, "end_frame": b, "start_s": a / FRAME_RATE, "end_s": b / FRAME_RATE,
                     "text_entropy": _nanmean(text_entropy[a:b]), "audio_entropy": _nanmean(audio_entropy[a:b]),
                     "content_tokens": float(np.mean(n_tok)), "repetition_rate": _nanmean(rep),
                     "distinct_1": _nanmean(d1), "distinct_2": _nanmean(d2),
                     "diversity": _nanmean(div),
                     "audio_repetition_rate": _nanmean(arep), "audio_distinct_1": _nanmean(ad1)})
    return rows


def _full(rows: list[dict]) -> list[dict]:
    """Windows of at least half the window length (a short last window is too noisy to judge)."""
    if not rows:
        return rows
    size = rows[0]["end_frame"] - rows[0]["start_frame"]
    return [r for r in rows if r["end_frame"] - r["start_frame"] >= size / 2]


def _trend(res: CheckResult, rows: list[dict], key: str, label: str, th: Thresholds) -> None:
    vals = [(r["start_frame"], r[key]) for r in _full(rows) if np.isfinite(r[key])]
    if len(vals) < 2:
        return
    first, last = vals[0][1], vals[-1][1]
    onset = next((f for f, v in vals if v >= th.salad_entropy), None)
    if onset is not None and first < th.salad_entropy:
        res.add("warn", f"{label} predictions near-uniform (normalised entropy >= {th.salad_entropy:g}: word salad) "
                f"from frame {onset} (t={onset / FRAME_RATE:.1f} s)", key)
    elif last - first > th.entropy_rise:
        res.add("warn", f"{label} entropy rises over the stream: {first:.3g} in the first window -> {last:.3g} in "
                f"the last (+{last - first:.3g} > {th.entropy_rise:g})", key)
    elif first > 0.05 and last < th.entropy_collapse * first:
        res.add("warn", f"{label} entropy collapses: {first:.3g} -> {last:.3g} (over-confident, loop-prone)", key)


def check_predictions(text_entropy, audio_entropy, text_tokens, audio_tokens, valid=None, window_frames: int = 125,
                      ignore_text=(), th: Thresholds = DEFAULTS, max_points: int = 256) -> CheckResult:
    """Entropy by position (``text_entropy``/``audio_entropy``: [T] normalised, NaN where unknown)
    and repetition/distinct-n per window of the predicted tokens ([B, T] or [T], -1 = none)."""
    res = CheckResult("predictions")
    text_entropy = np.asarray(text_entropy, dtype=np.float64)
    audio_entropy = np.asarray(audio_entropy, dtype=np.float64)
    text_tokens = np.atleast_2d(np.asarray(text_tokens))
    valid = np.ones(text_tokens.shape, bool) if valid is None else np.atleast_2d(np.asarray(valid, bool))
    rows = window_stats(text_entropy, audio_entropy, text_tokens, np.asarray(audio_tokens), valid, window_frames,
                        ignore_text, th.ngram)
    res.series = {"text_entropy": bucket(text_entropy, max_points), "audio_entropy": bucket(audio_entropy, max_points),
                  "windows": rows}
    res.metrics = {"window_frames": window_frames, "windows": len(rows), "frames": int(text_entropy.size),
                   "text_entropy_mean": _nanmean(text_entropy), "audio_entropy_mean": _nanmean(audio_entropy),
                   "text_entropy_first": rows[0]["text_entropy"] if rows else float("nan"),
                   "text_entropy_last": rows[-1]["text_entropy"] if rows else float("nan"),
                   "audio_entropy_first": rows[0]["audio_entropy"] if rows else float("nan"),
                   "audio_entropy_last": rows[-1]["audio_entropy"] if rows else float("nan"),
                   "repetition_first": rows[0]["repetition_rate"] if rows else float("nan"),
                   "repetition_last": rows[-1]["repetition_rate"] if rows else float("nan"),
                   "distinct_1_first": rows[0]["distinct_1"] if rows else float("nan"),
                   "distinct_1_last": rows[-1]["distinct_1"] if rows else float("nan")}
    _trend(res, rows, "text_entropy", "text", th)
    _trend(res, rows, "audio_entropy", "audio", th)
    for key, label in (("repetition_rate", "predicted text"), ("audio_repetition_rate", "predicted audio (codebook 0)")):
        vals = [(r["start_frame"], r[key]) for r in _full(rows) if np.isfinite(r[key])]
        if len(vals) >= 2 and vals[0][1] < th.loop_repetition:
            onset = next((f for f, v in vals if v >= th.loop_repetition), None)
            if onset is not None:
                res.add("warn", f"{label} repeats itself (loops): {th.ngram}-gram repetition >= {th.loop_repetition:g} "
                        f"from frame {onset} (t={onset / FRAME_RATE:.1f} s), {vals[0][1]:.2f} in the first window", key)
    if not res.flagged():
        res.add("ok", f"entropy and repetition stable over {seconds(text_entropy.size)}: text entropy "
                f"{res.metrics['text_entropy_first']:.3g} -> {res.metrics['text_entropy_last']:.3g}, "
                f"repetition {res.metrics['repetition_first']:.3g} -> {res.metrics['repetition_last']:.3g}")
    return res
