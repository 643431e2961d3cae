"""PNG figures of the evaluation results; every function takes the plain dicts the JSON files
hold (so the notebook can draw from the files) and returns a matplotlib ``Figure`` (built without
pyplot: no global backend or figure registry is touched; ``display(fig)`` shows it in Jupyter)."""

from __future__ import annotations

import math
from pathlib import Path

from moshi_ttt.constants import FRAME_RATE

PHASE_COLORS = {"coherent": "#2ca02c", "loops": "#ff7f0e", "fragmentation": "#d62728",
                "word_salad": "#9467bd", "silent": "#bbbbbb"}


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _finish(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _nan(x):
    return float("nan") if x is None else x


def plot_loss_curves(results: dict, path=None, ax=None):
    """Loss vs position (minutes, or seconds for sequences under two minutes), one line per model."""
    fig = ax.figure if ax is not None else _figure(figsize=(7, 4))
    ax = ax if ax is not None else fig.subplots()
    frames = max(r["frames"] for r in results.values())
    rate = next(iter(results.values()))["frame_rate"]
    in_seconds = frames < 2 * 60 * rate
    scale = 1 / rate if in_seconds else 1 / (60 * rate)
    for name, res in results.items():
        xs = [(c["start_frame"] + c["end_frame"]) / 2 * scale for c in res["curve"]]
        ax.plot(xs, [_nan(c["loss"]) for c in res["curve"]], marker="o", ms=3, label=name)
    for b in next(iter(results.values()))["buckets"][1:]:
        ax.axvline(b["start_frame"] * scale, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("position in the conversation (" + ("s" if in_seconds else "min") + ")")
    ax.set_ylabel("CE per token (nats)")
    ax.set_title("held-out loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_timeline(timeline: dict, path=None, title: str | None = None):
    """Entropy, repetition/diversity and the phase of every window of a generation timeline."""
    from matplotlib.patches import Rectangle

    fig = _figure(figsize=(9, 7), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})
    rate = timeline["frame_rate"]
    windows = timeline["windows"]
    t = [i / rate for i in range(len(timeline["text_entropy"]))]
    prompt_s = timeline["prompt_frames"] / rate
    ax = axes[0]
    ax.plot(t, [_nan(x) for x in timeline["text_entropy"]], lw=0.5, alpha=0.4, color="C0")
    ax.plot(t, [_nan(x) for x in timeline["audio_entropy"]], lw=0.5, alpha=0.4, color="C1")
    mids = [(w["start_s"] + w["end_s"]) / 2 for w in windows]
    ax.plot(mids, [_nan(w["text_entropy"]) for w in windows], "o-", color="C0", label="text entropy")
    ax.plot(mids, [_nan(w["word_entropy"]) for w in windows], "s--", color="C2", ms=3, label="text entropy at words")
    ax.plot(mids, [_nan(w["audio_entropy"]) for w in windows], "o-", color="C1", label="audio entropy")
    ax.set_ylabel("normalised entropy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.plot(mids, [_nan(w["repetition_rate"]) for w in windows], "o-", label="text n-gram repetition")
    ax.plot(mids, [_nan(w["diversity"]) for w in windows], "o-", label="text diversity (MATTR)")
    ax.plot(mids, [_nan(w["loop_coverage"]) for w in windows], "o-", label="text loop coverage")
    ax.plot(mids, [_nan(w["audio_repetition_rate"]) for w in windows], "x:", label="audio n-gram repetition")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[2]
    for w in windows:
        ax.axvspan(w["start_s"], w["end_s"], color=PHASE_COLORS.get(w["phase"], "black"), alpha=0.85)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    ax.legend(handles, list(PHASE_COLORS), fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.6))
    ax.set_yticks([])
    ax.set_xlabel("time (s)")
    for a in axes:
        if prompt_s > 0:
            a.axvline(prompt_s, color="black", ls="--", lw=0.8)
    axes[0].set_title(title or f"generation timeline (prompt: first {prompt_s:.1f} s, dashed line)")
    return _finish(fig, path)


def plot_recall(results: dict, path=None, ax=None):
    """Recall accuracy vs delay (seconds) per model, with chance."""
    fig = ax.figure if ax is not None else _figure(figsize=(6, 4))
    ax = ax if ax is not None else fig.subplots()
    delays = sorted({int(d) for r in results.values() for d in r["by_delay"]})
    width = 0.8 / max(1, len(results))
    for i, (name, r) in enumerate(results.items()):
        by = {int(d): _nan(v) for d, v in r["by_delay"].items()}
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(delays))]
        ax.bar(xs, [by.get(d, math.nan) for d in delays], width=width, label=name)
    chance = [r["chance"] for r in results.values() if r.get("chance") is not None]
    if chance:
        ax.axhline(max(chance), color="black", ls="--", lw=0.8, label="chance")
    ax.set_xticks(range(len(delays)), [f"{d}\n({d / FRAME_RATE:.0f} s)" for d in delays])
    ax.set_xlabel("delay between fact and recall (frames)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("long-range recall")
    return _finish(fig, path)
