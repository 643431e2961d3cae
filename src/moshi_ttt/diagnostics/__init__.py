"""The lab notes' checks as code (``python -m moshi_ttt.diagnose``).

Each check returns a :class:`CheckResult`: plain numbers (``metrics``), per-position ``series``
and findings (ok / warn / fail, each naming its layer or setting), so tests assert known answers.

- ``rope``: positions and relative distances reached vs the trained context and ``max_period``.
- ``context``: attention window and KV-cache capacity per layer vs the conversation (wraparound).
- ``ttt_usage``: gates / projections near zero, output change with TTT switched off.
- ``ttt_health``: fast-weight norm/mean/std and inner lr over a long stream; divergence.
- ``drift``: normalisation-input drift and residual-norm jumps by position.
- ``predictions``: text/audio entropy by position; repetition and distinct-n over time.

``run_diagnostics`` runs them (the long-stream ones share one chunked streaming pass, linear in
the length) and ``write_report`` writes ``report.json``, ``report.md`` and PNGs.
"""

from moshi_ttt.diagnostics.context import check_context
from moshi_ttt.diagnostics.drift import check_drift
from moshi_ttt.diagnostics.findings import CheckResult, Finding
from moshi_ttt.diagnostics.layout import ModelLayout, model_layout, ttt_modules
from moshi_ttt.diagnostics.predictions import check_predictions
from moshi_ttt.diagnostics.report import CHECKS, DiagnoseSettings, build_report, run_diagnostics, write_report
from moshi_ttt.diagnostics.rope import check_rope
from moshi_ttt.diagnostics.stream import iter_chunks, record_stream
from moshi_ttt.diagnostics.thresholds import Thresholds, parse_thresholds
from moshi_ttt.diagnostics.ttt_health import check_ttt_health
from moshi_ttt.diagnostics.usage import check_ttt_usage

__all__ = [
    "CHECKS",
    "CheckResult",
    "DiagnoseSettings",
    "Finding",
    "ModelLayout",
    "Thresholds",
    "build_report",
    "check_context",
    "check_drift",
    "check_predictions",
    "check_rope",
    "check_ttt_health",
    "check_ttt_usage",
    "iter_chunks",
    "model_layout",
    "parse_thresholds",
    "record_stream",
    "run_diagnostics",
    "ttt_modules",
    "write_report",
]
