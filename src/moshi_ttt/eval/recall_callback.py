"""Recall while training: at every validation, does the memory recall what the attention window lost?

At the end of each validation run the model is scored teacher-forced on a held-out recall set
(``moshi_ttt.eval.recall.recall_report``: the share of each recalled fact's tokens predicted exactly)
and the facts are split by their distance against the model's attention window
(``window_split``): ``val/recall_in_window`` (the fact is still inside what attention sees),
``val/recall_beyond_window`` (it is not: only a memory can recall it), ``val/recall_chance`` (a
uniform guess) and ``val/recall_seconds`` (what the scoring cost). Recall by distance goes to W&B
as a line plot of this validation (``val/recall_by_distance``, its table beside it) and, with the
whole report, to ``<out_dir>/step<N>.json`` (the notebook plots how it moves over training).

Every rank scores the whole set (the same forwards, so ZeRO-3's gathered parameters line up) and
logs the same numbers; only rank 0 writes files and W&B objects. Enable with
``callbacks=[default,recall]`` (``conf/callbacks/recall.yaml``; on in ``make demo`` and the 7B recipe).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning as L

from moshi_ttt.config.errors import ConfigError, bad
from moshi_ttt.data.shards import ShardFormatError, resolve_shards
from moshi_ttt.eval.position_loss import _json_safe
from moshi_ttt.eval.recall import attention_span, recall_report, window_split
from moshi_ttt.eval.samples import iter_samples

logger = logging.getLogger(__name__)


class RecallCallback(L.Callback):
    """Args:
        shards: the held-out recall set (a directory, glob, brace pattern or list of token shards whose
            ``meta.json`` has recall spans: ``python -m moshi_ttt.data.recall``).
        max_samples: conversations scored per validation (the first ones of the set; null: all).
        batch_size: conversations per forward.
        window_frames: the attention window a fact's distance is compared with; null: the widest
            attention window of the model's temporal transformer as the run configured it.
        out_dir: where each validation's report goes (``step<N>.json``); null: ``<run_dir>/recall``.
    """

    def __init__(self, shards, max_samples: int | None = 8, batch_size: int = 1, window_frames: int | None = None,
                 out_dir: str | None = None):
        self.shards, self.max_samples, self.batch_size = shards, max_samples, batch_size
        self.window_frames, self.out_dir = window_frames, out_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before the model is built: a bad setting stops the run here, as one line naming the key."""
        self.check()

    def check(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise bad("callbacks.recall.max_samples", self.max_samples, "a positive number of conversations, or null: all")
        if self.batch_size < 1:
            raise bad("callbacks.recall.batch_size", self.batch_size, "a positive integer")
        if self.window_frames is not None and self.window_frames < 1:
            raise bad("callbacks.recall.window_frames", self.window_frames, "a positive number of frames, or null")
        if self.shards is None:
            raise ConfigError("callbacks.recall.shards is not set (a held-out recall set: python -m "
                              "moshi_ttt.data.recall audio ...)")
        try:
            resolve_shards(self.shards)
            first = next(iter_samples(self.shards, 1), None)
        except (FileNotFoundError, ShardFormatError) as exn:
            raise bad("callbacks.recall.shards", str(self.shards), str(exn).splitlines()[0]) from exn
        if first is None or not ("recalls" in first.meta or "recall_span" in first.meta):
            raise bad("callbacks.recall.shards", str(self.shards), "holds no recall conversation (its meta.json has no "
                                                                   "recall spans: write one with python -m moshi_ttt.data.recall)")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        model = pl_module.model
        with trainer.precision_plugin.val_step_context():
            report = recall_report(model, self.shards, self.max_samples, self.batch_size)
        window = self.window_frames or attention_span(model)
        split = window_split(report, window)
        seconds = time.perf_counter() - start
        for name, value in (("recall_in_window", split["in_window"]), ("recall_beyond_window", split["beyond_window"]),
                            ("recall_chance", report["chance"]), ("recall_seconds", seconds)):
            pl_module.log(f"val/{name}", float(value), sync_dist=True, batch_size=1)
        if trainer.is_global_zero:
            self._write(trainer, report, split, window, seconds)

    def _write(self, trainer, report: dict, split: dict, window: int | None, seconds: float) -> None:
        step = int(trainer.global_step)
        rows = [[int(d), _finite(acc), c["text_tokens"] + c["audio_tokens"], window is not None and int(d) >= window]
                for (d, acc), c in zip(report["by_delay"].items(), report["by_delay_counts"].values())]
        root = Path(self.out_dir or Path(trainer.default_root_dir) / "recall")
        root.mkdir(parents=True, exist_ok=True)
        (root / f"step{step:08d}.json").write_text(json.dumps(_json_safe(
            {"step": step, "window_frames": window, "seconds": seconds, **split,
             **{k: report[k] for k in ("overall", "chance", "num_samples", "tokens", "by_delay", "by_delay_counts",
                                       "samples")}}), indent=1))
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                import wandb

                table = wandb.Table(columns=["distance_frames", "recall", "tokens", "beyond_window"], data=rows)
                title = f"recall by distance at step {step} (window {window} frames)"
                lg.log_metrics({"val/recall_by_distance": wandb.plot.line(table, "distance_frames", "recall",
                                                                          title=title)}, step=step)
        logger.info("recall at step %d: %.3f inside the %s-frame window, %.3f beyond (chance %.3f), %d conversations "
                    "in %.1f s", step, split["in_window"], window, split["beyond_window"], report["chance"],
                    report["num_samples"], seconds)


def _finite(value):
    """W&B tables take None, not NaN, for a distance without scored tokens."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
