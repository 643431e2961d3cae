"""Small helpers shared by tests (kept out of conftest so they can be imported explicitly)."""

from __future__ import annotations

from pathlib import Path

from moshi_ttt.training.metrics_io import read_csv_metrics


def read_metric(run_dir: str | Path, key: str) -> dict[int, float]:
    """step -> value of ``key`` from a run's CSV logs."""
    return read_csv_metrics(run_dir).get(key, {})


class StopAtStep:
    """A Lightning callback that ends fit() after a given optimizer step (an interruption)."""

    def __new__(cls, step: int):
        import lightning as L

        class _Stop(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _Stop()
