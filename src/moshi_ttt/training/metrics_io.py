"""Reading a run's CSV metrics back, across the attempts of a preempted-and-resumed run."""

from __future__ import annotations

import csv
import re
from pathlib import Path


def _version(path: Path) -> int:
    m = re.search(r"version_(\d+)", str(path))
    return int(m.group(1)) if m else -1


def read_csv_metrics(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value}. Each attempt logs to its own ``csv/version_N``; a step logged by
    an attempt that was later preempted before its checkpoint is overwritten by the rerun."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(run_dir).glob("csv/*/metrics.csv"), key=_version):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row["step"])
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in (None, ""):
                        out.setdefault(key, {})[step] = float(value)
    return out
