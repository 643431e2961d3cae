"""Small helpers shared by tests (kept out of conftest so they can be imported explicitly)."""

from __future__ import annotations

from pathlib import Path

from moshi_ttt.training.metrics_io import read_csv_metrics


def read_metric(run_dir: str | Path, key: str) -> dict[int, float]:
    """step -> value of ``key`` from a run's CSV logs."""
    return read_csv_metrics(run_dir).get(key, {})
