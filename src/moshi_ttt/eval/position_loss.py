"""Loss by position in long held-out conversations: does a model get worse the later it is?

Teacher-forced, the loss at frame ``t`` is the mean unweighted cross-entropy of the text token
and Moshi's 8 audio codebooks of that frame given everything before it (the per-token CE of
``moshi_ttt.training.loss.moshi_loss``, without the training weights, so text and audio tokens
count alike). It is reported in the training run's minute buckets (0-1, 1-4, 4-10, 10-30 min)
and as a finer curve (``frames_per_bucket`` frames per point; 750 = one point per minute).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moshi_ttt.eval.samples import model_device
from moshi_ttt.training.loss import LossConfig, moshi_loss
from moshi_ttt.training.module import FRAME_RATE, POSITION_BUCKETS_MIN

FRAMES_PER_MINUTE = int(60 * FRAME_RATE)  # 750


def _batches(codes, batch_size: int) -> Iterable[torch.Tensor]:
    """[B, 17, T] batches from a tensor ([17, T] or [N, 17, T]), a DataLoader of dict/tensor
    batches, or any iterable of those."""
    if isinstance(codes, Mapping):
        codes = codes["codes"]
    if isinstance(codes, torch.Tensor):
        if codes.dim() == 2:
            codes = codes[None]
        if codes.dim() != 3:
            raise ValueError(f"codes must be [17, T] or [N, 17, T], got {tuple(codes.shape)}")
        yield from codes.split(batch_size)
        return
    for item in codes:
        yield from _batches(item, batch_size)


@dataclass
class FrameLosses:
    """Per-frame sums over every evaluated sequence (index = frame position)."""

    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    text_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    text_count: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    sequences: int = 0

    def add(self, loss: torch.Tensor, count: torch.Tensor, text_loss: torch.Tensor, text_count: torch.Tensor):
        T = loss.shape[-1]
        if T > self.loss.shape[0]:
            for name in ("loss", "count", "text_loss", "text_count"):
                old = getattr(self, name)
                setattr(self, name, torch.cat([old, torch.zeros(T - old.shape[0], dtype=torch.float64)]))
        for name, value in (("loss", loss), ("count", count), ("text_loss", text_loss), ("text_count", text_count)):
            getattr(self, name)[:T] += value.detach().double().cpu()

    @property
    def frames(self) -> int:
        return int(self.loss.shape[0])

    def span(self, a: int, b: int) -> dict:
        """Mean losses over frames [a, b)."""
        n, nt = float(self.count[a:b].sum()), float(self.text_count[a:b].sum())
        s, st = float(self.loss[a:b].sum()), float(self.text_loss[a:b].sum())
        nan = float("nan")
        return {"loss": s / n if n else nan, "text_loss": st / nt if nt else nan,
                "audio_loss": (s - st) / (n - nt) if n - nt else nan, "tokens": int(n)}


@torch.no_grad()
def frame_losses(model, codes, batch_size: int = 1, into: FrameLosses | None = None) -> FrameLosses:
    """Teacher-forced per-frame CE sums of ``model`` over ``codes`` (see :func:`_batches`)."""
    model.eval()
    acc = into if into is not None else FrameLosses()
    device = model_device(model)
    pads = (model.text_padding_token_id, model.end_of_text_padding_id)
    for batch in _batches(codes, batch_size):
        batch = batch.to(device=device, dtype=torch.long)
        out = model(batch)
        res = moshi_loss(out, batch, LossConfig(), pads, model.audio_offset)
        text_mask = out.text_mask[:, 0] & (batch[:, 0] >= 0)
        text_ce = torch.zeros(text_mask.shape, dtype=torch.float32, device=batch.device)
        text_ce[text_mask] = F.cross_entropy(out.text_logits[:, 0][text_mask].float(), batch[:, 0][text_mask],
                                             reduction="none")
        acc.add(res.token_losses.sum(0), res.token_counts.sum(0), text_ce.sum(0), text_mask.sum(0))
        acc.sequences += batch.shape[0]
    return acc


def _bucket_name(lo: float, hi: float | None) -> str:
    fmt = lambda x: f"{x:g}"  # noqa: E731
    return f"{fmt(lo)}+min" if hi is None else f"{fmt(lo)}-{fmt(hi)}min"


def summarize(acc: FrameLosses, frames_per_bucket: int = FRAMES_PER_MINUTE,
              buckets_min=POSITION_BUCKETS_MIN, frame_rate: float = FRAME_RATE) -> dict:
    """The result dict of :func:`position_losses` from accumulated per-frame sums."""
    if frames_per_bucket < 1:
        raise ValueError(f"frames_per_bucket must be >= 1, got {frames_per_bucket}")
    T = acc.frames
    per_min = 60 * frame_rate
    edges = [(lo, hi) for lo, hi in buckets_min]
    if edges and T > int(edges[-1][1] * per_min):
        edges.append((edges[-1][1], None))
    buckets = []
    for lo, hi in edges:
        a = int(round(lo * per_min))
        b = T if hi is None else min(T, int(round(hi * per_min)))
        if a >= T:
            break
        buckets.append({"bucket": _bucket_name(lo, hi), "start_frame": a, "end_frame": b,
                        "start_min": a / per_min, "end_min": b / per_min, **acc.span(a, b)})
    curve = []
    for a in range(0, T, frames_per_bucket):
        b = min(T, a + frames_per_bucket)
        curve.append({"start_frame": a, "end_frame": b, "minute": (a + b) / 2 / per_min, **acc.span(a, b)})
    return {"frames": T, "sequences": acc.sequences, "frames_per_bucket": frames_per_bucket,
            "frame_rate": frame_rate, **acc.span(0, T), "buckets": buckets, "curve": curve}


def position_losses(model, codes, frames_per_bucket: int = FRAMES_PER_MINUTE, batch_size: int = 1,
                    buckets_min=POSITION_BUCKETS_MIN) -> dict:
    """Loss by position of ``model`` on ``codes`` (a ``[N, 17, T]`` tensor, or a loader/iterable of
    batches, ``{"codes": ...}`` dicts included; -1 marks padding).

    Returns ``{"frames", "sequences", "frames_per_bucket", "frame_rate", "loss", "text_loss",
    "audio_loss", "tokens", "buckets": [...], "curve": [...]}``: every bucket/curve point has
    ``start_frame``/``end_frame`` ([a, b)), ``loss``, ``text_loss``, ``audio_loss`` (mean CE per
    valid token, NaN when it holds none) and ``tokens``; buckets are the training run's minute
    buckets (a ``30+min`` one is added past 30 min), named like ``0-1min``."""
    return summarize(frame_losses(model, codes, batch_size), frames_per_bucket, buckets_min)


@dataclass
class LossComparison:
    """Several models' :func:`position_losses` on the same conversations."""

    results: dict[str, dict]

    def rows(self) -> list[dict]:
        """Long format (one row per model x bucket/curve point/overall), as written to CSV."""
        out = []
        for name, res in self.results.items():
            out.append({"model": name, "kind": "overall", "bucket": "all", "start_frame": 0,
                        "end_frame": res["frames"], "start_min": 0.0,
                        "end_min": res["frames"] / (60 * res["frame_rate"]), "minute": "",
                        **{k: res[k] for k in ("loss", "text_loss", "audio_loss", "tokens")}})
            for b in res["buckets"]:
                out.append({"model": name, "kind": "bucket", "minute": "", **b})
            for c in res["curve"]:
                per_min = 60 * res["frame_rate"]
                out.append({"model": name, "kind": "curve", "bucket": f"{c['start_frame']}-{c['end_frame']}",
                            "start_min": c["start_frame"] / per_min, "end_min": c["end_frame"] / per_min, **c})
        return out

    CSV_FIELDS = ("model", "kind", "bucket", "start_frame", "end_frame", "start_min", "end_min", "minute", "loss",
                  "text_loss", "audio_loss", "tokens")

    def write_csv(self, path) -> Path:
        return write_csv_rows(path, self.CSV_FIELDS, self.rows())

    def write_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(_json_safe(self.results), indent=2))
        return path

    def markdown(self, max_curve_rows: int = 60) -> str:
        names = list(self.results)
        bucket_names: list[str] = []
        for res in self.results.values():
            for b in res["buckets"]:
                if b["bucket"] not in bucket_names:
                    bucket_names.append(b["bucket"])
        any_res = next(iter(self.results.values()))
        lines = [f"Loss by position (mean CE per valid token, teacher-forced; {any_res['sequences']} "
                 f"sequence(s) of up to {any_res['frames']} frames)", "",
                 "| model | all | " + " | ".join(bucket_names) + " |",
                 "| --- | ---: | " + " | ".join("---:" for _ in bucket_names) + " |"]
        for name in names:
            res = self.results[name]
            by = {b["bucket"]: b["loss"] for b in res["buckets"]}
            lines.append(f"| {name} | {_fmt(res['loss'])} | "
                         + " | ".join(_fmt(by.get(b, float("nan"))) for b in bucket_names) + " |")
        clipped = [f"{b['bucket']} ends at frame {b['end_frame']}" for b in any_res["buckets"]
                   if b["bucket"].endswith("min") and "+" not in b["bucket"]
                   and b["end_frame"] < round(float(b["bucket"].split("-")[1][:-3]) * 60 * any_res["frame_rate"])]
        if clipped:
            lines += ["", "Buckets stop at the sequences' end: " + "; ".join(clipped) + "."]
        lines += ["", f"Curve ({any_res['frames_per_bucket']} frames per point)", "",
                  "| frames | minute | " + " | ".join(names) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
        curves = {n: {c["start_frame"]: c for c in self.results[n]["curve"]} for n in names}
        starts = sorted({s for c in curves.values() for s in c})
        step = max(1, math.ceil(len(starts) / max_curve_rows))
        for s in starts[::step]:
            ref = next(c[s] for c in curves.values() if s in c)
            lines.append(f"| {ref['start_frame']}-{ref['end_frame']} | {ref['minute']:.3f} | "
                         + " | ".join(_fmt(curves[n][s]["loss"]) if s in curves[n] else "" for n in names) + " |")
        return "\n".join(lines) + "\n"


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def write_csv_rows(path, fields, rows) -> Path:
    """Rows (dicts) as CSV with the given columns (others ignored), floats to 6 significant digits."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def compare_models(models: Mapping[str, torch.nn.Module], codes, frames_per_bucket: int = FRAMES_PER_MINUTE,
                   batch_size: int = 1, buckets_min=POSITION_BUCKETS_MIN) -> LossComparison:
    """:func:`position_losses` of every model on the same ``codes`` (a tensor, or a re-iterable
    loader: each model reads it again)."""
    if not models:
        raise ValueError("compare_models needs at least one model")
    return LossComparison({name: position_losses(m, codes, frames_per_bucket, batch_size, buckets_min)
                           for name, m in models.items()})
