"""Part TRAIN_STEP: one training step of the 7B shape against the planner's memory and time."""

from __future__ import annotations

import math
import time

import torch

from .common import (
    TRAIN_STEP,
    VARIANTS,
    Events,
    Job,
    Row,
    Settings,
    build_variant,
    compose,
    error,
    fmt_gib,
    free_memory,
    gib,
    is_oom,
    peak_gib,
    plain,
    random_codes,
    reset_peak,
    sync,
    within,
)


def autocast_dtype(trainer_cfg: dict) -> torch.dtype | None:
    """The autocast Lightning's precision plugin would use for ``trainer.precision``."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def train_step(model, optimizer, codes: torch.Tensor, amp: torch.dtype | None) -> float:
    """What one Lightning optimizer step does: forward + Moshi's loss under autocast, backward,
    AdamW, gradients set to None."""
    from moshi_ttt.training.loss import LossConfig, moshi_loss

    with torch.autocast(codes.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(codes)
        pads = (model.text_padding_token_id, model.end_of_text_padding_id)
        loss = moshi_loss(out, codes, LossConfig(), pads, model.audio_offset).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def planner_estimates(cfg, frames: list[int], s: Settings) -> dict[int, dict]:
    """``moshi_ttt.plan`` for this config on one GPU of this kind, batch 1, each length (its step
    time only when the GPU's peak FLOP/s is known)."""
    from dataclasses import replace

    from moshi_ttt import plan as P

    inputs = P.prepare(cfg)
    flops = s.peak_flops
    hw = P.Hardware(gpus=1, gpu_memory_gib=s.gpu_memory_gib or 1e6, gpu_flops=flops or 989e12)
    out = {}
    for T in frames:
        stage = replace(inputs.stages[0], frames=T, batch_size=1, accumulate=1, window=None)
        plan = inputs.run(hw, stages=[stage])[0]
        out[T] = {"memory_gib": plan.total - plan.overhead, "step_s": plan.step_time_s if flops else None,
                  "mfu": hw.mfu, "executed_flops": plan.executed_flops_per_frame * T}
    return out


def part_train_step(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    for case in cases:
        variant = case["id"]
        events.write(event="start", case=variant)
        trainer = ["trainer=cpu"] if s.dry_run else ["trainer=gpu"]
        model = optimizer = None
        try:
            cfg = compose([*s.model_overrides, *VARIANTS[variant], *trainer, "curriculum=none", "data.batch_size=1"])
            try:
                plans = planner_estimates(cfg, s.lengths, s)
            except ValueError as exn:
                if "nothing to train" not in str(exn):
                    raise
                events.row(Row(TRAIN_STEP, variant, "SKIP", note=f"not run: {str(exn).split(':')[0]} in this config"))
                events.write(event="done", case=variant)
                continue
            amp = autocast_dtype(plain(cfg.trainer))
            t0 = time.perf_counter()
            model = build_variant(cfg, s.device).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                          betas=(0.9, 0.95))  # no other reference: freed with the model
            build_s = time.perf_counter() - t0
        except Exception as exn:  # noqa: BLE001 - reported, the next variant still runs
            status = "OOM" if is_oom(exn) else "FAIL"
            events.row(Row(TRAIN_STEP, f"{variant} (build)", status, note=error(exn)))
            del model, optimizer
            free_memory()
            events.write(event="done", case=variant)
            continue
        failed_at = None
        for T in s.lengths:
            label = f"{variant} T={T}"
            plan = plans[T]
            ref = f"plan {fmt_gib(plan['memory_gib'])}" + (f", {plan['step_s']:.3g} s" if plan["step_s"] else "")
            if failed_at is not None:
                events.row(Row(TRAIN_STEP, label, "SKIP", reference=ref, note=f"not run: T={failed_at} already failed"))
                continue
            codes = random_codes(model, T, s.device)
            try:
                times, losses = [], []
                for _ in range(2):  # the first step at a length also pays the allocator's growth
                    sync(s.device)
                    reset_peak(s.device)
                    resident = gib(torch.cuda.memory_allocated()) if s.device.startswith("cuda") else None
                    t0 = time.perf_counter()
                    losses.append(train_step(model, optimizer, codes, amp))
                    sync(s.device)
                    times.append(time.perf_counter() - t0)
                peak = peak_gib(s.device)
            except Exception as exn:  # noqa: BLE001
                failed_at = T
                optimizer.zero_grad(set_to_none=True)
                free_memory()
                status = "OOM" if is_oom(exn) else "FAIL"
                events.row(Row(TRAIN_STEP, label, status, reference=ref, note=error(exn)))
                continue
            step_s = times[-1]
            data = {"frames": T, "peak_gib": peak, "resident_gib": resident, "step_s": step_s,
                    "build_s": build_s, "loss": losses[-1], "plan": plan}
            ratios, notes, status = [], [], "PASS"
            if not all(math.isfinite(v) for v in losses):
                status, notes = "FAIL", [f"non-finite loss {losses}"]
            if peak is not None:
                mem_ratio = peak / plan["memory_gib"]
                data["memory_ratio"] = mem_ratio
                ratios.append(f"mem {mem_ratio:.2f}x")
                if not within(mem_ratio) and status == "PASS":
                    status = "WARN"
                    notes.append(f"planner memory off by {100 * (mem_ratio - 1):+.0f} %")
            if plan["step_s"]:
                time_ratio = step_s / plan["step_s"]
                data["time_ratio"] = time_ratio
                implied = plan["mfu"] * plan["step_s"] / step_s  # the MFU at which the planner's time is right
                data["implied_mfu"] = implied
                ratios.append(f"time {time_ratio:.2f}x")
                notes.append(f"MFU {implied:.2g} (plan {plan['mfu']:.2g})")
                if not within(time_ratio) and status == "PASS" and not s.dry_run:
                    status = "WARN"
            measured = f"peak {fmt_gib(peak)}, {step_s:.3g} s"
            events.row(Row(TRAIN_STEP, label, status, measured, ref, ", ".join(ratios), "; ".join(notes), data))
        del model, optimizer
        free_memory()
        events.write(event="done", case=variant)
