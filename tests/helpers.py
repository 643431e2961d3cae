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


def tiny_variant_model(kw: dict, variant: str, window: int, context: int = 64, seed: int = 0,
                       attention_window: int | None = None, lora: int = 0, ttt_layer: dict | None = None,
                       **ttt_keys):
    """(frozen tiny base, the same base + optional LoRA + ``variant`` in layers 0 and -1, the product's memory).
    ``variant`` may name a read mode after a colon (``cache_replacement:kv_slots``); ``ttt_layer``
    and ``ttt_keys`` add ``ttt.ttt_layer.*`` and ``ttt.*`` settings."""
    import copy

    from moshi_ttt.models import MoshiSourceConfig, load_base_moshi
    from moshi_ttt.models.insert import install_ttt
    from moshi_ttt.models.lora import apply_lora

    base = load_base_moshi(MoshiSourceConfig(source="tiny", lm_kwargs={**kw, "context": context}, seed=seed))
    model = copy.deepcopy(base)
    if lora:
        apply_lora(model, lora)
    name, _, read = variant.partition(":")
    install_ttt(model, {"variant": name, "layer_indices": [0, -1], "ttt_layer_attention_window": window,
                        "attention_window": attention_window, "memory_read": read or "add",
                        "ttt_layer": dict(ttt_layer or {}), **ttt_keys})
    return base, model


def open_trainables(model, seed: int = 1) -> None:
    """Move every trainable parameter (TTT gates and projections, LoRA B) off its start.

    token_bias is left alone: it shifts the 1/(i+1) position factors, and noise there can zero the
    last one, which (correctly) cancels every mini-batch update."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "token_bias" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def random_codes(kw: dict, B: int = 2, T: int = 48, seed: int = 0):
    """Random tokens [B, 17, T] in the tiny model's vocabularies."""
    import torch

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, kw["card"], (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, kw["text_card"], (B, T), generator=g)
    return codes
