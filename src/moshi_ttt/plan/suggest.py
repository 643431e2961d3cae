"""What would make a failing stage fit: each change re-planned, with its new total."""

from __future__ import annotations

from dataclasses import replace

from moshi_ttt.plan.config import Hardware, PlanError
from moshi_ttt.plan.estimate import PlanInputs, StagePlan


def suggestions(inputs: PlanInputs, failing: StagePlan, hw: Hardware) -> list[str]:
    """Changes that would make the failing stage fit, each with its new total."""
    s = inputs.strategy
    stage = next(x for x in inputs.stages if x.index == failing.index)
    gpus = hw.gpus
    candidates: list[tuple[str, dict, int]] = []
    zero3 = replace(s, name="DeepSpeed ZeRO-3", deepspeed=True, zero_stage=3, half=True)
    if not (s.deepspeed and s.zero_stage == 3):
        candidates.append(("trainer=deepspeed_zero3", {"strategy": zero3}, gpus))
    if not (s.offload_optimizer and s.offload_param):
        off = replace(zero3, name="DeepSpeed ZeRO-3 + offload", offload_optimizer=True, offload_param=True)
        candidates.append(("trainer=deepspeed_zero3_offload", {"strategy": off}, gpus))
    if not inputs.model_cfg.get("gradient_checkpointing"):
        candidates.append(("model.gradient_checkpointing=true",
                           {"model_cfg": {**inputs.model_cfg, "gradient_checkpointing": True}}, gpus))
    if not inputs.shape.dep_checkpointing:
        candidates.append(("+model.lm_kwargs.gradient_checkpointing=true (checkpoints the depformer too)",
                           {"shape": replace(inputs.shape, dep_checkpointing=True)}, gpus))
    if stage.batch_size > 1:
        smaller = [replace(x, batch_size=1) if x.index == stage.index else x for x in inputs.stages]
        candidates.append((f"curriculum.stages.{stage.index}.batch_size=1 (and {stage.batch_size}x the GPUs or steps "
                           "for the same tokens)", {"stages": smaller}, gpus))
    together: dict = {}
    for _, change, _ in candidates:
        together.update(change)  # the offload strategy comes after ZeRO-3, so it wins
    if len(candidates) > 1:
        candidates.append(("all of the above", together, gpus))
    for n in (2 * gpus, 4 * gpus):
        candidates.append((f"--gpus {n}", {}, n))
    out = []
    for label, change, n in candidates:
        try:
            alt = inputs.run(replace(hw, gpus=n), **change)
        except PlanError:
            continue
        new = next(p for p in alt if p.index == failing.index)
        if new.total < failing.total - 0.05:
            mark = "fits" if new.fits else "still over"
            out.append(f"{label}: {new.total:.1f} GiB ({mark})")
    return out
