"""The table: the rows as text (printed) and as Markdown (gpu_check.md), under a line that
describes the machine."""

from __future__ import annotations

import torch

from .common import Row, Settings, gib, part_name

COLUMNS = ("part", "case", "status", "measured", "reference", "ratio", "note")


def _cells(row: Row) -> list[str]:
    return [f"{row.part} {part_name(row.part)}", row.case, row.status, row.measured, row.reference, row.ratio,
            row.note]


def render_text(rows: list[Row], header: str) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = [header]
    for i, c in enumerate(cells):
        lines.append("  ".join([v.ljust(w) for v, w in zip(c[:-1], widths)] + [c[-1]]).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(lines) + "\n"


def render_markdown(rows: list[Row], header: str) -> str:
    def esc(v: str) -> str:
        return v.replace("|", "\\|")

    lines = [f"# gpu-check\n\n{header}\n", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(v) for v in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def describe_machine(s: Settings) -> str:
    if s.dry_run:
        return f"DRY RUN on CPU at tiny sizes (torch {torch.__version__}): code paths only, numbers mean nothing"
    props = torch.cuda.get_device_properties(0)
    peak = s.peak_flops
    return (f"{props.name}, {gib(props.total_memory):.0f} GiB, bf16 peak "
            f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (set MOSHI_TTT_PEAK_FLOPS)'}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")
