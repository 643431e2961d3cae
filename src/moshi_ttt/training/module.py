"""The LightningModule: frozen Moshi + trainable adapters, Moshi's loss, honest metrics."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from moshi_ttt.config.schema import DistillConfig, OptimConfig  # the schema is the one definition
from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.models import count_parameters
from moshi_ttt.models.segments import bind_segments, release_segments, segment_context
from moshi_ttt.training.distill import capture_hidden, distill_loss, distill_settings, teacher_forward
from moshi_ttt.training.loss import LossConfig, moshi_loss

logger = logging.getLogger(__name__)

# Loss by position inside the sequence, in minutes (the long-memory question is "late" loss).
POSITION_BUCKETS_MIN = ((0, 1), (1, 4), (4, 10), (10, 30))
# Dense bf16 peak FLOP/s by device name, for model-FLOPs utilisation (override: MOSHI_TTT_PEAK_FLOPS).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops() -> float | None:
    import os

    if os.environ.get("MOSHI_TTT_PEAK_FLOPS"):
        return float(os.environ["MOSHI_TTT_PEAK_FLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_frame(counts: dict[str, int]) -> float:
    """Matmul FLOPs per frame of a frozen-base fine-tune: forward 2N, backward 2N for activation
    gradients through every weight plus 2N_trainable for weight gradients (attention scores
    and embeddings ignored: an estimate that errs low)."""
    return 4.0 * counts["total"] + 2.0 * counts["trainable"]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup then cosine decay to ``min_ratio`` at ``total``."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MoshiTTTModule(L.LightningModule):
    """Trains only the adapter parameters of a frozen Moshi.

    The model comes from ``model_factory`` (called once, in ``configure_model``) so that the
    7B base is built on the right device by the strategy, and checkpoints carry only what
    trains: the base is reloaded from its source on resume.
    """

    def __init__(self, model_factory: Callable[[], nn.Module], loss: LossConfig | None = None,
                 optim: OptimConfig | None = None, curriculum=None):
        super().__init__()
        self.curriculum = curriculum
        self.model_factory = model_factory
        self.loss_cfg = loss or LossConfig()
        if not isinstance(self.loss_cfg.distill, DistillConfig):  # a plain dict (checkpoint, test)
            self.loss_cfg = dataclasses.replace(self.loss_cfg, distill=distill_settings(self.loss_cfg.distill))
        self.optim_cfg = optim or OptimConfig()
        self.model: nn.Module | None = None
        self.strict_loading = False  # frozen base weights are not in our checkpoints
        self._t_last: float | None = None

    # ---- model ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.model_factory()
        counts = count_parameters(self.model)
        if counts["trainable"] == 0:
            raise ValueError("nothing to train: enable model.lora.rank>0 or choose a ttt variant (ttt=...)")
        logger.info("parameters: trainable %s, frozen %s (%.4f%% trainable)", f"{counts['trainable']:,}",
                    f"{counts['frozen']:,}", 100 * counts["trainable"] / counts["total"])
        self.param_counts = counts

    def trainable_named_parameters(self):
        assert self.model is not None
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def on_fit_start(self) -> None:
        for lg in self.loggers:
            lg.log_hyperparams({f"params/{k}": v for k, v in self.param_counts.items()})

    def forward(self, codes: torch.Tensor):
        return self.model(codes)

    # ---- steps ---------------------------------------------------------------------------
    def distill_weight(self) -> float:
        """Weight of the teacher's loss at the current step: the stage's ``distill_weight`` under a
        curriculum when set, else ``loss.distill.weight`` (0: no teacher forward)."""
        weight = self.loss_cfg.distill.weight
        if self.curriculum:
            stage = self.curriculum.stages[self.curriculum.locate(self.global_step)[0]]
            if stage.distill_weight is not None:
                weight = stage.distill_weight
        return float(weight)

    def _shared_step(self, batch: dict, prefix: str):
        codes = batch["codes"]
        resets = batch.get("reset_at_boundaries")
        segments = batch.get("segments") if resets is not None and bool(resets.all()) else None
        text_pads = (self.model.text_padding_token_id, self.model.end_of_text_padding_id)
        distill = self.loss_cfg.distill
        weight = self.distill_weight() if prefix == "train" else 0.0
        teacher = student_hidden = None
        if prefix == "train":  # kept bound through backward: checkpointed layers run their forward again there
            bind_segments(segments)
            if weight > 0:  # the frozen base with the teacher's window, first: only its outputs are kept
                teacher = teacher_forward(self.model, codes, distill, audio=bool(self.loss_cfg.audio_weight))
            if teacher is not None and distill.target == "hidden":
                with capture_hidden(self.model) as box:
                    out = self.model(codes)
                student_hidden = box["hidden"]
            else:
                out = self.model(codes)
        else:
            with segment_context(segments):
                out = self.model(codes)
        res = moshi_loss(out, codes, self.loss_cfg, text_pads, self.model.audio_offset)
        B, _, T = codes.shape
        sync = prefix != "train"
        loss = res.loss
        if teacher is not None:
            d = distill_loss(out, teacher, codes, self.loss_cfg, text_pads, self.model.audio_offset, student_hidden)
            del teacher
            loss = res.loss + weight * d
            self.log(f"{prefix}/distill_loss", d, batch_size=B)
            self.log(f"{prefix}/moshi_loss", res.loss, batch_size=B)
        res.loss = loss
        self.log(f"{prefix}/loss", res.loss, prog_bar=True, batch_size=B, sync_dist=sync)
        self.log(f"{prefix}/text_loss", res.text_loss, batch_size=B, sync_dist=sync)
        self.log(f"{prefix}/audio_loss", res.audio_loss, batch_size=B, sync_dist=sync)
        for k, v in enumerate(res.per_codebook):
            self.log(f"{prefix}/codebook_{k}_loss", v, batch_size=B, sync_dist=sync)
        for lo, hi in POSITION_BUCKETS_MIN:
            a, b = int(lo * 60 * FRAME_RATE), min(T, int(hi * 60 * FRAME_RATE))
            if a >= T:
                break
            n = res.token_counts[:, a:b].sum()
            if n > 0:
                self.log(f"{prefix}/loss_{lo}-{hi}min", res.token_losses[:, a:b].sum() / n, batch_size=B,
                         sync_dist=sync)
        return res, B, T

    def training_step(self, batch: dict, batch_idx: int):
        res, B, T = self._shared_step(batch, "train")
        now = time.perf_counter()
        if self._t_last is not None:
            dt = max(now - self._t_last, 1e-9)
            frames = B * T * self.trainer.world_size
            self.log("train/frames_per_s", frames / dt, batch_size=B)
            self.log("train/tokens_per_s", frames * 9 / dt, batch_size=B)  # moshi-finetune's count
            peak = peak_flops()
            if peak:
                self.log("train/mfu", frames * flops_per_frame(self.param_counts) / dt / (peak * self.trainer.world_size),
                         batch_size=B)
        self._t_last = now
        if "skipped" in batch:
            self.log("data/skipped_samples", batch["skipped"].max().float(), batch_size=B, reduce_fx="max")
        if "negative_ids" in batch:  # samples whose negative token ids (not the padding value) were read as padding
            self.log("data/negative_id_samples", batch["negative_ids"].max().float(), batch_size=B, reduce_fx="max")
        if "segments" in batch:  # share of this stage's sequences that join several conversations
            packed = (batch["segments"][:, -1] > 0).float().mean()
            self.log("data/packed_fraction", packed, batch_size=B)
        return res.loss

    def validation_step(self, batch: dict, batch_idx: int):
        self._shared_step(batch, "val")

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().float().norm() for _, p in self.trainable_named_parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())
        # The LR of this optimizer step, logged here (not at batch end) so that a checkpoint
        # written at the batch end already has it in the step's metrics row.
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Under DeepSpeed the gradients live in the engine's (ZeRO-partitioned) buffers and every
        # p.grad is None, so on_before_optimizer_step finds none: log the global norm DeepSpeed
        # computed in this step (over all ranks, before clipping).
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        norm = engine.get_global_grad_norm() if engine is not None else None
        if norm is not None:
            self.log("train/grad_norm", float(norm))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        release_segments()  # this batch's backward (and any recomputation in it) is done

    # ---- optimisation --------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """AdamW groups: ``optim.group_lr_scale`` by name first, then the TTT modules' opening
        parameters at ``optim.opening_lr_scale`` without weight decay, the rest at scale 1 (first,
        so ``train/lr`` logs the base LR)."""
        cfg = self.optim_cfg
        if cfg.opening_lr_scale <= 0:
            raise ValueError(f"optim.opening_lr_scale={cfg.opening_lr_scale} must be > 0")
        assert self.model is not None
        opening = {id(p) for m in self.model.modules() if hasattr(m, "opening_parameters")
                   for p in m.opening_parameters()}
        groups: dict[tuple[float, bool], list] = {}
        for name, p in self.trainable_named_parameters():
            scale = next((s for key, s in cfg.group_lr_scale.items() if key in name), None)
            is_opening = id(p) in opening
            if scale is None:
                scale = cfg.opening_lr_scale if is_opening else 1.0
            groups.setdefault((float(scale), is_opening), []).append(p)
        return [{"params": ps, "lr": cfg.lr * s, "lr_scale": s,
                 "weight_decay": 0.0 if is_opening else cfg.weight_decay}
                for (s, is_opening), ps in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0]))]

    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
        if self.curriculum:
            curriculum = self.curriculum
            schedule = functools.partial(curriculum.lr_multiplier, base_lr=cfg.lr)
        else:
            schedule = functools.partial(warmup_cosine, warmup=cfg.warmup_steps, total=cfg.total_steps,
                                         min_ratio=cfg.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoints: only what trains ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {f"model.{n}" for n, _ in self.trainable_named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["param_counts"] = getattr(self, "param_counts", None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        if "state_dict" not in checkpoint:
            return  # DeepSpeed restores the weights itself and keeps them out of the client state
        expected = {f"model.{n}" for n, _ in self.trainable_named_parameters()}
        got = set(checkpoint["state_dict"])
        if expected != got:
            missing, unexpected = sorted(expected - got)[:5], sorted(got - expected)[:5]
            raise ValueError(
                "checkpoint does not match the configured adapters "
                f"(missing {missing}, unexpected {unexpected}): resume with the same model/ttt config"
            )
