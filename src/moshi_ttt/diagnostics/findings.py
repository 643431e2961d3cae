"""What every check returns: numbers plus findings (ok / warn / fail, each naming its layer or setting)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moshi_ttt.constants import FRAME_RATE

SEVERITIES = ("ok", "warn", "fail")
RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass
class Finding:
    """One verdict of a check. ``layer`` names the layer (``layer3``) or setting it is about."""

    severity: str
    check: str
    message: str
    layer: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"finding severity {self.severity!r} must be one of {SEVERITIES}")

    def to_dict(self) -> dict:
        return {"severity": self.severity, "check": self.check, "layer": self.layer, "message": self.message}


@dataclass
class CheckResult:
    """A check's plain numbers (``metrics``), its findings, and per-position ``series`` for plots
    (already bucketed to a few hundred points, so the JSON stays small at 30 minutes)."""

    check: str
    metrics: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    series: dict = field(default_factory=dict)

    def add(self, severity: str, message: str, layer: str | None = None) -> Finding:
        f = Finding(severity, self.check, message, layer)
        self.findings.append(f)
        return f

    @property
    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=RANK.__getitem__, default="ok")

    def flagged(self, *severities: str) -> list[Finding]:
        """Findings of the given severities (default: warn and fail)."""
        wanted = severities or ("warn", "fail")
        return [f for f in self.findings if f.severity in wanted]

    def mentions(self, text: str, *severities: str) -> bool:
        """Whether a finding (of the given severities, default warn/fail) contains ``text``."""
        return any(text in f.message for f in self.flagged(*severities))

    def to_dict(self) -> dict:
        return jsonable({"check": self.check, "worst": self.worst, "metrics": self.metrics,
                         "findings": [f.to_dict() for f in self.findings], "series": self.series})


def jsonable(obj):
    """numpy scalars/arrays to Python, NaN/Inf to None, tuples to lists, keys to str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    return obj


def bucket(values, max_points: int = 256, start: int = 0) -> dict:
    """A per-frame series averaged over at most ``max_points`` equal buckets (NaN-aware):
    ``{"frame": [bucket centre frames], "value": [means]}``."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    T = v.shape[0]
    if T == 0:
        return {"frame": [], "value": []}
    size = max(1, math.ceil(T / max_points))
    edges = list(range(0, T, size))
    frames, means = [], []
    for a in edges:
        chunk = v[a : a + size]
        finite = chunk[np.isfinite(chunk)]
        bad = chunk[~np.isfinite(chunk) & ~np.isnan(chunk)]
        if bad.size:  # an Inf inside a bucket is the news, not something to average away
            means.append(float(bad[0]))
        else:
            means.append(float(finite.mean()) if finite.size else float("nan"))
        frames.append(start + a + (min(T, a + size) - a - 1) / 2)
    return {"frame": frames, "value": means}


def seconds(frames: float) -> str:
    """``'3750 frames (5.0 min)'``-style text for a frame count at 12.5 frames/s."""
    s = frames / FRAME_RATE
    if s >= 120:
        return f"{frames:.0f} frames ({s / 60:.1f} min)"
    return f"{frames:.0f} frames ({s:.1f} s)"
