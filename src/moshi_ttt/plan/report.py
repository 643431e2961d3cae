"""The plan as text: the per-stage table, the header lines, the recall callback's line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moshi_ttt.plan.config import Hardware
from moshi_ttt.plan.estimate import PlanInputs, StagePlan, recall_validation_cost


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rows(plans: list[StagePlan]) -> list[tuple[str, list[str]]]:
    def gib(attr: str) -> list[str]:
        return [f"{getattr(p, attr):.2f}" for p in plans]

    distilling = any(p.distill_weight > 0 for p in plans)

    return [
        ("frames x batch (x accum)", [f"{p.frames} x {p.batch_size}" + (f" x {p.accumulate}" if p.accumulate > 1
                                                                       else "") for p in plans]),
        ("attention window", [str(p.window) for p in plans]),
        ("base weights", gib("base_weights")),
        ("ZeRO-3 gathered params", gib("gathered_params")),
        ("trainable params", gib("trainable_params")),
        ("gradients", gib("gradients")),
        ("optimizer states", gib("optimizer")),
        ("comm buffers", gib("comm_buffers")),
        ("  kept layer inputs", gib("layer_inputs")),
        ("  layer recompute (bwd)", gib("layer_recompute")),
        ("  TTT scan (bwd)", gib("ttt")),
        ("  depformer acts (loss)", gib("depformer")),
        ("  logits + loss (loss)", gib("logits")),
        *([("  teacher outputs + KL (loss)", gib("teacher")), ("  teacher forward peak", gib("teacher_forward"))]
          if distilling else []),
        ("activations (peak)", [f"{p.activations:.2f} ({p.activation_phase})" for p in plans]),
        ("CUDA/NCCL overhead", gib("overhead")),
        ("TOTAL GiB / GPU", gib("total")),
        ("headroom GiB", [f"{p.headroom:+.2f}" for p in plans]),
        ("CPU RAM GiB / GPU (offload)", gib("cpu_offload")),
        ("GFLOP / frame (model | exec)", [f"{p.model_flops_per_frame / 1e9:.3g} | "
                                          f"{p.executed_flops_per_frame / 1e9:.3g}" for p in plans]),
        ("frames/s per GPU", [f"{p.frames_per_s_gpu:,.0f}" for p in plans]),
        ("tokens/s all GPUs", [f"{p.tokens_per_s_total:,.0f}" for p in plans]),
        ("comm GB / step (link | PCIe)", [f"{p.comm_gb:.1f} | {p.pcie_gb:.1f}" for p in plans]),
        *([("distill weight | teacher fwd", [f"{p.distill_weight:g} | " + (
            f"{p.teacher_flops_per_frame / 1e9:.3g} GFLOP/frame, {_duration(p.teacher_time_s)}/step"
            if p.distill_weight > 0 else "none") for p in plans])] if distilling else []),
        ("step time (bound)", [f"{_duration(p.step_time_s)} ({p.bound})" for p in plans]),
        ("stage time (steps)", [f"{_duration(p.stage_time_s)} ({p.steps})" for p in plans]),
    ]


def render(plans: list[StagePlan], header: str, rich: bool | None = None) -> str:
    """The plan as a table: a rich table on a terminal, plain aligned text otherwise."""
    rows = _rows(plans)
    titles = [f"{p.index}: {p.name}" for p in plans]
    use_rich = sys.stdout.isatty() if rich is None else rich
    if use_rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=header, title_justify="left")
        table.add_column("per GPU")
        for t, p in zip(titles, plans):
            table.add_column(t, justify="right", style=None if p.fits else "bold red")
        for label, values in rows:
            table.add_row(label, *values, style="bold" if label.startswith("TOTAL") else None)
        console = Console(width=max(100, 32 + 26 * len(plans), *(len(line) for line in header.splitlines())))
        with console.capture() as capture:
            console.print(table)
        return capture.get()
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(t), *(len(r[1][i]) for r in rows)) for i, t in enumerate(titles)]
    lines = [header, "  ".join(["per GPU".ljust(width0)] + [t.rjust(w) for t, w in zip(titles, widths)])]
    lines.append("-" * len(lines[-1]))
    for label, values in rows:
        lines.append("  ".join([label.ljust(width0)] + [v.rjust(w) for v, w in zip(values, widths)]))
    return "\n".join(lines) + "\n"


def describe(inputs: PlanInputs, plans: list[StagePlan], hw: Hardware) -> str:
    sh, t, c = inputs.shape, inputs.ttt, plans[0].counts
    ttt = "none" if t is None else (f"{t.variant} in layers {list(t.layers)}, {t.heads} heads x {t.head_dim}, "
                                    + (f"delta rule, chunks of {t.chunk}, checkpoint group {t.group} chunks"
                                       if t.rule == "delta" else
                                       f"{t.inner}, mini-batch {t.mini_batch}, scan group {t.group}"))
    on = {True: "on", False: "off"}
    return (f"model: dim {sh.dim}, {sh.num_layers} layers, depformer {sh.dep_dim} x {sh.dep_layers}; parameters: "
            f"frozen {c['frozen']:,}, trainable {c['trainable']:,} (LoRA {c['lora']:,}, TTT {c['ttt']:,})\n"
            f"ttt: {ttt}\n"
            f"strategy: {inputs.strategy.name} on {hw.gpus} GPU(s), {hw.nodes} node(s): {hw.gpu_memory_gib:g} GiB, "
            f"{hw.gpu_flops / 1e12:g} TFLOP/s at MFU {hw.mfu:g}, link {hw.link:g} GB/s, PCIe {hw.pcie_gbs:g} GB/s\n"
            f"activations: {c['activation_bytes']} B/element, backward from layer {c['first_backward_layer']}, "
            f"checkpointing {on[bool(inputs.model_cfg.get('gradient_checkpointing'))]} "
            f"(depformer {on[sh.dep_checkpointing]})\n" + _describe_distill(inputs, plans))


def _describe_distill(inputs: PlanInputs, plans: list[StagePlan]) -> str:
    teaching = [p for p in plans if p.distill_weight > 0]
    if not teaching:
        return ""
    d = inputs.distill
    window = d.get("teacher_window") or inputs.shape.context
    extra = ", ".join(f"{p.name}: {p.teacher_time_s / p.step_time_s:.0%} of its step time" for p in teaching)
    return (f"distill: teacher = the frozen base over {window} frames (TTT and LoRA off), target "
            f"{d.get('target', 'logits')}, one extra no-grad forward per step in stage(s) "
            f"{', '.join(str(p.index) for p in teaching)} ({extra}); it keeps only its outputs\n")


def _describe_recall(cfg, inputs: PlanInputs, plans: list[StagePlan], hw: Hardware) -> str:
    """One line on the recall callback's cost, when the config selects it (its set's index.json gives the
    conversations' mean length; without a readable one, the longest stage's)."""
    from omegaconf import OmegaConf

    spec = OmegaConf.select(cfg, "callbacks.recall", default=None)
    if spec is None:
        return ""
    samples, frames = OmegaConf.select(cfg, "callbacks.recall.max_samples", default=8, throw_on_missing=False), None
    try:
        index = json.loads((Path(str(OmegaConf.select(cfg, "callbacks.recall.shards"))) / "index.json").read_text())
        frames = round(index["total_frames"] / index["total_samples"])
        samples = min(samples or index["total_samples"], index["total_samples"])
    except Exception:  # noqa: BLE001 - a set not made yet: assume conversations as long as the longest stage
        pass
    frames = frames or max(p.frames for p in plans)
    samples = samples or 8
    seconds, gib = recall_validation_cost(inputs, hw, frames, samples)
    validations = len(plans) if len(inputs.stages) > 1 or inputs.stages[0].name != "default" else max(
        1, inputs.stages[0].steps // int(OmegaConf.select(cfg, "trainer.val_check_interval", default=0) or 10**9))
    run = sum(p.stage_time_s for p in plans)
    return (f"recall callback: {samples} conversation(s) x {frames:,} frames scored at each of {validations} "
            f"validation(s): {seconds:.1f} s and {gib:.1f} GiB (logits + one layer) per GPU each, "
            f"{_duration(seconds * validations)} in all ({seconds * validations / max(run, 1e-9):.1%} of the stages' time)\n")
