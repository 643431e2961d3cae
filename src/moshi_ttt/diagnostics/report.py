"""The runner: every check on one model, collected into ``report.json`` + ``report.md`` + PNGs.

``report.json`` (schema ``moshi_ttt.diagnose/1``)::

    {"schema", "name", "created", "settings": {frames, stream_frames, chunk_frames, ...},
     "model": {layout: dim, rope_max_period, ttt_variant, layers: [{name, kind, window, ...}]},
     "summary": {"status": "ok|warn|fail", "counts": {"ok", "warn", "fail"}, "flagged": [messages]},
     "findings": [{"severity", "check", "layer", "message"}, ...],   # every check's, worst first
     "checks": {CHECK: {"check", "worst", "metrics": {...}, "findings": [...], "series": {...}}},
     "plots": {CHECK: "CHECK.png"}}

CHECKs: rope, context, ttt_usage, ttt_health, drift, predictions. ``series`` hold per-position
curves bucketed to <= 256 points as ``{"frame": [...], "value": [...]}``; NaN is written as null.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.diagnostics.context import check_context
from moshi_ttt.diagnostics.drift import check_drift
from moshi_ttt.diagnostics.findings import RANK, CheckResult, jsonable, seconds
from moshi_ttt.diagnostics.layout import model_layout
from moshi_ttt.diagnostics.plots import PLOTTERS
from moshi_ttt.diagnostics.predictions import check_predictions
from moshi_ttt.diagnostics.rope import check_rope
from moshi_ttt.diagnostics.stream import default_chunk_frames, record_stream, without_padding
from moshi_ttt.diagnostics.thresholds import DEFAULTS, Thresholds
from moshi_ttt.diagnostics.ttt_health import check_ttt_health
from moshi_ttt.diagnostics.usage import check_ttt_usage

logger = logging.getLogger(__name__)
SCHEMA = "moshi_ttt.diagnose/1"
CHECKS = ("rope", "context", "ttt_usage", "ttt_health", "drift", "predictions")
STREAM_CHECKS = ("ttt_health", "drift", "predictions")


@dataclass
class DiagnoseSettings:
    frames: int  # the intended conversation length (static checks), 12.5 frames/s
    chunk_frames: int | None = None  # streaming chunk; None: the TTT mini-batch (else 16)
    window_frames: int = 125  # windows of the drift / entropy / repetition statistics (10 s)
    usage_frames: int = 750  # frames compared with TTT on vs off (1 min)
    trained_context: int | None = None  # None: each layer's configured context
    audio: bool = True  # depformer entropies / tokens
    checks: tuple[str, ...] = CHECKS
    thresholds: Thresholds = field(default_factory=lambda: DEFAULTS)
    source: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.checks) - set(CHECKS)
        if unknown:
            raise ValueError(f"--checks: unknown check(s) {sorted(unknown)}; known: {', '.join(CHECKS)}")
        for key in ("frames", "window_frames", "usage_frames"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(self, key)} must be >= 1")
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise ValueError(f"--chunk-frames={self.chunk_frames} must be >= 1")
        if self.trained_context is not None and self.trained_context < 1:
            raise ValueError(f"--trained-context={self.trained_context} must be >= 1")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checks"] = list(self.checks)
        return d


def run_checks(model, codes: torch.Tensor | None, settings: DiagnoseSettings) -> list[CheckResult]:
    """Every requested check; the long-stream ones share one streaming pass over ``codes``."""
    th, want = settings.thresholds, set(settings.checks)
    layout = model_layout(model)
    results: list[CheckResult] = []
    if "rope" in want:
        results.append(check_rope(layout, settings.frames, settings.trained_context))
    if "context" in want:
        results.append(check_context(layout, settings.frames, 1 if codes is None else int(codes.shape[0])))
    if codes is None:
        return results
    chunk = settings.chunk_frames or default_chunk_frames(model)
    if "ttt_usage" in want:
        results.append(check_ttt_usage(model, codes[..., : settings.usage_frames], chunk, th))
    if want & set(STREAM_CHECKS):
        logger.info("streaming %s", seconds(codes.shape[-1]))
        rec = record_stream(model, codes, chunk, audio=settings.audio, log_every=750)
        if "ttt_health" in want:
            results.append(check_ttt_health(rec.ttt_chunks, rec.ttt_initial, rec.ttt_info, th))
        if "drift" in want:
            windows = {lay.name: lay.window for lay in layout.layers}
            results.append(check_drift({k: rec.mean(v) for k, v in rec.residual_rms.items()},
                                       {k: {s: rec.mean(a) for s, a in v.items()} for k, v in rec.norm_inputs.items()},
                                       windows, settings.window_frames, th))
        if "predictions" in want:
            results.append(check_predictions(rec.mean(rec.text_entropy), rec.mean(rec.audio_entropy), rec.text_argmax,
                                             rec.audio_argmax, rec.valid, settings.window_frames,
                                             layout.text_padding_ids, th))
    return results


def build_report(name: str, results: list[CheckResult], settings: DiagnoseSettings, layout: dict | None = None,
                 stream_frames: int | None = None, spec: str | None = None, padding_frames: int = 0) -> dict:
    findings = sorted((f for r in results for f in r.findings), key=lambda f: -RANK[f.severity])
    counts = {s: sum(f.severity == s for f in findings) for s in RANK}
    status = max((f.severity for f in findings), key=RANK.__getitem__, default="ok")
    return jsonable({
        "schema": SCHEMA, "name": name, "spec": spec, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {**settings.to_dict(), "stream_frames": stream_frames, "padding_frames_not_streamed": padding_frames,
                     "frame_rate": FRAME_RATE},
        "model": layout or {},
        "summary": {"status": status, "counts": counts,
                    "flagged": [f"[{f.severity}] {f.check}: {f.message}" for f in findings if f.severity != "ok"]},
        "findings": [f.to_dict() for f in findings],
        "checks": {r.check: r.to_dict() for r in results},
        "plots": {},
    })


def run_diagnostics(model, codes: torch.Tensor | None, settings: DiagnoseSettings, name: str = "model",
                    spec: str | None = None) -> dict:
    """All checks on ``model`` (eval mode, frozen) and ``codes`` [N, 17, T] (None: static checks only).

    The stream stops where the shortest sequence's padding (-1) starts: padding is never streamed."""
    settings = replace(settings, chunk_frames=settings.chunk_frames or default_chunk_frames(model))
    padding = 0
    if codes is not None:
        codes, padding = without_padding(codes)
        if padding:
            logger.warning("%s: %d padded frames at the end are not streamed (%d frames of conversation%s)", name,
                           padding, codes.shape[-1], "" if codes.shape[0] == 1 else " in every sequence")
    results = run_checks(model, codes, settings)
    return build_report(name, results, settings, model_layout(model).to_dict(),
                        None if codes is None else int(codes.shape[-1]), spec, padding)


def write_report(report: dict, out_dir) -> dict[str, Path]:
    """``report.json``, ``report.md`` and one PNG per plotted check under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for check, data in report["checks"].items():
        plotter = PLOTTERS.get(check)
        if plotter is None or (check == "ttt_usage" and not data["series"]) or (
                check == "ttt_health" and not data["series"]):
            continue
        path = out / f"{check}.png"
        if check == "context":
            plotter(data, report["checks"].get("rope"), path=path)
        else:
            plotter(data, path=path)
        report["plots"][check] = path.name
        written[check] = path
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
    written["json"], written["md"] = out / "report.json", out / "report.md"
    return written


# ---- markdown --------------------------------------------------------------------------------
TITLES = {"rope": "RoPE reach", "context": "Attention context and KV cache", "ttt_usage": "TTT usage",
          "ttt_health": "TTT state health", "drift": "Normalisation-input drift and residual jumps",
          "predictions": "Entropy and repetition by position"}
ICON = {"ok": "ok", "warn": "**warn**", "fail": "**FAIL**"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "-"
    return str(v).replace("|", "\\|")


def _scalar_table(d: dict) -> list[str]:
    rows = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
    if not rows:
        return []
    return ["| metric | value |", "| --- | ---: |", *[f"| {k} | {_fmt(v)} |" for k, v in rows], ""]


def _rows_table(rows: dict, first: str = "layer") -> list[str]:
    if not rows:
        return []
    cols = []
    for r in rows.values():
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
    return [f"| {first} | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols),
            *[f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for name, r in rows.items()], ""]


def render_markdown(report: dict) -> str:
    s, st = report["summary"], report["settings"]
    lines = [f"# Diagnostics: {report['name']}", ""]
    if report.get("spec"):
        lines += [f"Model: `{report['spec']}`", ""]
    lines += [f"Intended conversation: {seconds(st['frames'])}; streamed "
              f"{seconds(st['stream_frames']) if st.get('stream_frames') else 'nothing (static checks only)'} of "
              f"{st.get('source') or 'tokens'} in chunks of {st.get('chunk_frames')} frames; windows of "
              f"{st['window_frames']} frames. Written {report['created']}.", "",
              f"**Status: {s['status']}** ({s['counts']['fail']} fail, {s['counts']['warn']} warn, "
              f"{s['counts']['ok']} ok)", "", "## Findings", "", "| severity | check | layer / setting | finding |",
              "| --- | --- | --- | --- |"]
    for f in report["findings"]:
        lines.append(f"| {ICON[f['severity']]} | {f['check']} | {f['layer'] or '-'} | {_fmt(f['message'])} |")
    lines.append("")
    for check, data in report["checks"].items():
        m = data["metrics"]
        lines += [f"## {TITLES.get(check, check)} ({data['worst']})", ""]
        lines += _scalar_table(m)
        for key in ("layers", "norm_inputs", "residual", "output"):
            if isinstance(m.get(key), dict) and m[key]:
                if key == "output":
                    lines += _scalar_table(m[key])
                else:
                    lines += _rows_table(m[key], "layer" if key == "layers" else "module")
        if check == "predictions" and data["series"].get("windows"):
            rows = {f"{r['start_s']:.0f}-{r['end_s']:.0f} s": {k: v for k, v in r.items() if k not in (
                "start_frame", "end_frame", "start_s", "end_s")} for r in data["series"]["windows"]}
            lines += _rows_table(rows, "window")
        if check in report.get("plots", {}):
            lines += [f"![{check}]({report['plots'][check]})", ""]
    return "\n".join(lines) + "\n"
