"""The plan: every stage of a config on one GPU, from the named formulas of ``memory``, ``flops`` and ``comm``.

``prepare`` reads a composed config once (model and TTT shapes on the meta device, strategy, stages);
``PlanInputs.run`` plans it on a ``Hardware``, and ``plan_stages`` puts each stage's terms together.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace

from moshi_ttt.plan.comm import link_bytes_per_step, pcie_bytes_per_step, step_time, traffic
from moshi_ttt.plan.config import (
    GIB,
    Hardware,
    PlanError,
    StageSpec,
    Strategy,
    _plain,
    model_dtype_bytes,
    stages_from_config,
    strategy_from_config,
)
from moshi_ttt.plan.flops import (
    attention_flops,
    backward_flops,
    compute_seconds,
    effective_window,
    forward_flops,
    inference_flops,
    predicted_tokens_per_frame,
    recompute_flops,
    teacher_forward_flops,
)
from moshi_ttt.plan.memory import (
    activation_bytes,
    activation_peak,
    attention_block_bytes,
    backward_phase_bytes,
    depformer_loss_bytes,
    first_backward_layer,
    gradient_transient_bytes,
    kept_layer_bytes,
    kept_ttt_bytes,
    layer_backward_bytes,
    logits_loss_bytes,
    scoring_peak_bytes,
    teacher_forward_peak_bytes,
    teacher_loss_bytes,
    teacher_output_width,
    teacher_outputs_bytes,
    temporal_saved,
    total_bytes,
    trainable_params,
    ttt_scan_backward_bytes,
    ttt_scan_saved_bytes,
    ttt_scan_term_bytes,
    weight_memory,
)
from moshi_ttt.plan.shapes import ModelShape, TTTShape, model_shape, ttt_shape


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One stage on one GPU. Memory terms in GiB, FLOPs per frame of one sample."""

    index: int
    name: str
    frames: int
    batch_size: int
    accumulate: int
    steps: int
    window: int
    world_size: int
    strategy: str
    # weights and optimizer
    base_weights: float
    gathered_params: float
    trainable_params: float
    gradients: float
    optimizer: float
    comm_buffers: float
    # activations
    layer_inputs: float  # kept through the step (checkpointed inputs, or every saved tensor without it)
    layer_recompute: float  # backward phase: the largest recomputed layer and its gradients
    ttt: float  # TTT scan: saved streams and fast-weight checkpoints (+ group backward)
    depformer: float  # loss phase
    logits: float  # loss phase
    activations: float  # peak: kept + max(loss phase, backward phase)
    activation_phase: str
    overhead: float
    total: float
    available: float
    cpu_offload: float  # CPU RAM per GPU process under offload
    # throughput
    model_flops_per_frame: float
    executed_flops_per_frame: float
    frames_per_s_gpu: float
    tokens_per_s_total: float
    comm_gb: float  # collective traffic per GPU and optimizer step
    pcie_gb: float  # host <-> GPU traffic per GPU and step (offload)
    compute_time_s: float
    step_time_s: float  # max(compute, link, PCIe): communication fully overlapped at best
    bound: str
    stage_time_s: float
    counts: dict = field(default_factory=dict)
    # loss.distill: the teacher's extra no-grad forward of the frozen base (zero where the stage has none)
    distill_weight: float = 0.0
    teacher: float = 0.0  # loss phase: the teacher's outputs (compute dtype) + the KL's fp32 tensors
    teacher_forward: float = 0.0  # peak of the teacher's own forward (before the student's; nothing else kept)
    teacher_flops_per_frame: float = 0.0
    teacher_time_s: float = 0.0  # per optimizer step

    @property
    def headroom(self) -> float:
        return self.available - self.total

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def terms(self) -> dict[str, float]:
        """Memory terms that add up to ``total`` (activations as their peak)."""
        return {
            "base weights": self.base_weights, "ZeRO-3 gathered params": self.gathered_params,
            "trainable params": self.trainable_params, "gradients": self.gradients,
            "optimizer states": self.optimizer, "comm buffers": self.comm_buffers,
            "activations (peak)": self.activations, "CUDA/NCCL overhead": self.overhead,
        }

    def biggest(self, n: int = 3) -> list[tuple[str, float]]:
        parts = {k: v for k, v in self.terms().items() if k != "activations (peak)"}
        parts.update({"kept layer inputs/activations": self.layer_inputs})
        if self.activation_phase == "teacher":
            parts = {k: v for k, v in parts.items() if k != "kept layer inputs/activations"}
            parts.update({"teacher forward (distill)": self.teacher_forward})
        elif self.activation_phase == "loss":
            parts.update({"depformer activations": self.depformer, "logits + loss": self.logits})
            if self.teacher:
                parts.update({"teacher outputs + KL (distill)": self.teacher})
        else:
            parts.update({"layer recompute": self.layer_recompute, "TTT scan": self.ttt})
        return sorted(parts.items(), key=lambda kv: -kv[1])[:n]



# ---------------------------------------------------------------------------------------------
# what train.py refuses
# ---------------------------------------------------------------------------------------------
def check_something_trains(psi: int) -> None:
    """Training refuses a model without a trainable parameter (``MoshiTTTModule.configure_model``):
    ``Psi`` = 0 when LoRA is off and there is no TTT variant."""
    if psi == 0:
        raise PlanError("nothing to train: model.lora.rank=0 and ttt.variant=none (train.py refuses this config); "
                        "choose ttt=<variant> or set model.lora.rank>0")


def check_deepspeed_accumulation(strategy: Strategy, stages: list[StageSpec]) -> None:
    """DeepSpeed fixes gradient accumulation when its engine starts, so validation refuses a stage
    that accumulates under it (``config.validate``'s trainer check)."""
    if strategy.deepspeed and any(s.accumulate > 1 for s in stages):
        raise PlanError("curriculum.stages.*.accumulate > 1 is not supported with DeepSpeed (train.py refuses it): "
                        "use accumulate: 1 and more GPUs or a larger batch_size")


def check_stage_mini_batches(ttt: TTTShape | None, stages: list[StageSpec]) -> None:
    """Each stage's ``ttt_mini_batch_size`` through the one rule validation and the layers share
    (``check_stage_mini_batch``): null or the size the layers were built with, which is therefore the
    size every stage runs."""
    if not ttt:
        return
    from moshi_ttt.ttt import check_stage_mini_batch

    for s in stages:
        try:
            check_stage_mini_batch(s.ttt_mini_batch_size, ttt.mini_batch, f"curriculum.stages.{s.index}.ttt_mini_batch_size")
        except ValueError as exn:
            raise PlanError(str(exn)) from exn


# ---------------------------------------------------------------------------------------------
# attention windows
# ---------------------------------------------------------------------------------------------
def model_window(ttt_cfg: dict, num_layers: int, context: int | None, stage_window: int | None = None) -> int | None:
    """The attention window of the temporal layers that follow the model's setting (None: unbounded):
    the stage's ``attention_window``, else ``ttt.attention_window``, else the model's context, as
    ``models.insert.student_windows`` resolves it for training and validation. It is asked for the
    model without its variant; the layers of a variant that fixes its own window (hybrid,
    cache_replacement) keep the one they were built with (``TTTShape.windows``, ``layer_window``)."""
    from moshi_ttt.models.insert import student_windows

    settings = _without_variant(json.dumps(ttt_cfg, sort_keys=True))
    (window,) = student_windows(settings, num_layers, context, stage_window).values()
    return window


@functools.lru_cache(maxsize=32)
def _without_variant(ttt_json: str):
    """The ``ttt`` section read as training reads it (``ttt_settings``: a tenth of a second, hence the
    cache), its variant taken out."""
    from moshi_ttt.config.groups import ttt_settings
    from moshi_ttt.models.variants import NO_TTT

    return replace(ttt_settings(json.loads(ttt_json)), variant=NO_TTT)


def layer_window(ttt: TTTShape | None, layer: int, window: int | None, frames: int) -> int:
    """The keys a query of temporal layer ``layer`` can reach in a sequence of ``frames``: the window
    its variant fixed when it was built, else ``window`` (None: all), never more than the sequence."""
    w = ttt.windows.get(layer, window) if ttt else window
    return frames if w is None else min(int(w), frames)


def teacher_window(distill: dict | None, context: int | None, frames: int) -> int:
    """The teacher's attention window in a sequence of ``frames``: ``loss.distill.teacher_window``, null:
    the model's context (``teacher_view`` gives every attention that window, or leaves it its own),
    never more than the sequence."""
    window = (distill or {}).get("teacher_window") or context
    return frames if window is None else min(int(window), frames)


# ---------------------------------------------------------------------------------------------
# every stage
# ---------------------------------------------------------------------------------------------
def plan_stages(shape: ModelShape, ttt: TTTShape | None, ttt_cfg: dict, model_cfg: dict, strategy: Strategy,
                stages: list[StageSpec], hw: Hardware, distill: dict | None = None) -> list[StagePlan]:
    """Each stage on one GPU of ``hw``: memory terms (``memory``), FLOPs (``flops``), traffic and step
    time (``comm``). Raises ``PlanError`` for a config train.py refuses."""
    psi = trainable_params(shape, ttt)
    check_something_trains(psi)
    check_deepspeed_accumulation(strategy, stages)
    check_stage_mini_batches(ttt, stages)
    W = hw.gpus
    if W < 1:
        raise PlanError(f"--gpus must be >= 1, got {W}")

    model_bytes = model_dtype_bytes(model_cfg)
    a = activation_bytes(model_bytes, strategy)
    L, D = shape.num_layers, shape.dim
    weights = weight_memory(shape, ttt, strategy, model_bytes, W)
    first = first_backward_layer(shape, ttt)
    backward_layers = list(range(first, L))
    flow = traffic(shape, ttt, strategy, model_bytes, first, W)
    checkpointing = bool(model_cfg.get("gradient_checkpointing"))
    chunk = ttt_cfg.get("attention_chunk_size")
    ttt_layers = set(ttt.layers) if ttt else set()
    saved = temporal_saved(shape, a)
    transient = gradient_transient_bytes(D, shape.hidden, a)
    target = (distill or {}).get("target", "logits")

    plans = []
    for s in stages:
        T, B = s.frames, s.batch_size
        tokens = B * T
        win = model_window(ttt_cfg, L, shape.context, s.window)
        # ---- attention, per layer: FLOPs per query and the block its backward recomputes
        windows = [layer_window(ttt, i, win, T) for i in range(L)]
        visits = [effective_window(T, w, chunk) for w in windows]
        attention = [attention_flops(visited, D) for visited, _ in visits]
        blocks = [attention_block_bytes(B, shape.num_heads, c, w, T) for w, (_, c) in zip(windows, visits)]
        # ---- the TTT scan: one layer's saved set and its backward's transient
        scan_saved = scan_backward = 0.0
        inner = 0
        if ttt:
            scan_saved = ttt_scan_saved_bytes(ttt, D, a, T, B)
            scan_backward = ttt_scan_backward_bytes(ttt, T, B)
            inner = ttt.inner_flops(ttt.mini_batch)
        # ---- kept through the step / backward phase / loss phase
        working = {i: layer_backward_bytes(transient, blocks[i], saved, tokens, checkpointing) for i in backward_layers}
        recompute = max(working.values(), default=0.0)
        kept = kept_layer_bytes(len(backward_layers), saved, a, D, tokens, checkpointing)
        ttt_kept = kept_ttt_bytes(len(ttt_layers), scan_saved, checkpointing)
        backward_phase = backward_phase_bytes(working, ttt_layers, scan_saved, scan_backward, checkpointing)
        dep = depformer_loss_bytes(shape, a, tokens)
        logits = logits_loss_bytes(shape, a, tokens)
        # ---- loss.distill: the teacher's no-grad forward runs first and keeps only its outputs
        teacher_loss = teacher_peak = teacher_flops = 0.0
        if s.distill_weight > 0:
            t_win = teacher_window(distill, shape.context, T)
            t_visited, t_chunk = effective_window(T, t_win, chunk)
            width = teacher_output_width(shape, target)
            outputs = teacher_outputs_bytes(width, a, tokens)
            teacher_loss = teacher_loss_bytes(outputs, width, tokens, target)
            teacher_peak = teacher_forward_peak_bytes(
                shape, a, tokens, attention_block_bytes(B, shape.num_heads, t_chunk, t_win, T), outputs)
            teacher_flops = teacher_forward_flops(shape, t_visited)
        act, phase = activation_peak(kept, ttt_kept, dep + logits, teacher_loss, backward_phase, teacher_peak)
        total = total_bytes(weights, act, hw.overhead_gib * GIB)
        # ---- FLOPs per frame of one sample, and the step's time
        model_flops = (forward_flops(shape, ttt, attention, inner)
                       + backward_flops(shape, ttt, attention, inner, backward_layers))
        model_flops += teacher_flops
        executed = model_flops + recompute_flops(shape, ttt, attention, inner, backward_layers, checkpointing)
        frames = s.accumulate * B * T
        compute = compute_seconds(frames, executed, hw)
        link = link_bytes_per_step(flow, s.accumulate, W)
        pcie = pcie_bytes_per_step(flow, s.accumulate)
        step, bound = step_time(compute, link, pcie, hw)
        fps = frames / step
        plans.append(StagePlan(
            index=s.index, name=s.name, frames=T, batch_size=B, accumulate=s.accumulate, steps=s.steps,
            window=min(int(win), T) if win else T, world_size=W, strategy=strategy.name,
            base_weights=weights.base / GIB, gathered_params=weights.gathered / GIB,
            trainable_params=weights.params / GIB, gradients=weights.grads / GIB, optimizer=weights.optimizer / GIB,
            comm_buffers=weights.comm / GIB, layer_inputs=kept / GIB, layer_recompute=recompute / GIB,
            ttt=ttt_scan_term_bytes(ttt_kept, scan_saved, scan_backward, checkpointing) / GIB,
            depformer=dep / GIB, logits=logits / GIB, activations=act / GIB, activation_phase=phase,
            overhead=hw.overhead_gib, total=total / GIB, available=float(hw.gpu_memory_gib),
            cpu_offload=weights.cpu / GIB, model_flops_per_frame=model_flops, executed_flops_per_frame=executed,
            frames_per_s_gpu=fps, tokens_per_s_total=fps * W * predicted_tokens_per_frame(shape.dep_q),
            comm_gb=link / 1e9, pcie_gb=pcie / 1e9, compute_time_s=compute, step_time_s=step,
            bound=bound, stage_time_s=step * s.steps,
            counts={"frozen": shape.frozen, "lora": shape.lora, "ttt": ttt.params if ttt else 0, "trainable": psi,
                    "first_backward_layer": first, "activation_bytes": a},
            distill_weight=s.distill_weight, teacher=teacher_loss / GIB, teacher_forward=teacher_peak / GIB,
            teacher_flops_per_frame=teacher_flops, teacher_time_s=compute_seconds(frames, teacher_flops, hw),
        ))
    return plans


# ---------------------------------------------------------------------------------------------
# inputs, read once from the config
# ---------------------------------------------------------------------------------------------
@dataclass
class PlanInputs:
    shape: ModelShape
    ttt: TTTShape | None
    ttt_cfg: dict
    model_cfg: dict
    strategy: Strategy
    stages: list[StageSpec]
    distill: dict = field(default_factory=dict)  # loss.distill

    def run(self, hw: Hardware, **changes) -> list[StagePlan]:
        f = {**{k: getattr(self, k) for k in self.__dataclass_fields__}, **changes}
        return plan_stages(f["shape"], f["ttt"], f["ttt_cfg"], f["model_cfg"], f["strategy"], f["stages"], hw,
                           f["distill"])


def prepare(cfg) -> PlanInputs:
    from omegaconf import OmegaConf

    from moshi_ttt.config.groups import model_dict, ttt_dict

    model_cfg = model_dict(cfg.model)  # the schema's defaults filled in
    ttt_cfg = ttt_dict(OmegaConf.select(cfg, "ttt"))  # renamed keys moved, defaults filled in
    strategy = strategy_from_config(_plain(cfg.trainer))
    shape = model_shape(model_cfg, strategy.persistence)
    distill = _plain(OmegaConf.select(cfg, "loss.distill"))
    return PlanInputs(shape, ttt_shape(ttt_cfg, shape), ttt_cfg, model_cfg, strategy, stages_from_config(cfg),
                      distill)


def plan(cfg, gpus: int, gpu_memory_gib: float = 80.0, gpu_flops: float = 989e12, mfu: float = 0.35,
         overhead_gib: float = 3.0, nodes: int = 1, link_gbs: float | None = None,
         pcie_gbs: float = 25.0) -> list[StagePlan]:
    """Estimate every stage of ``cfg`` (a composed train config) on ``gpus`` GPUs.

    Raises ``PlanError`` for a config train.py would refuse before running (nothing trainable,
    DeepSpeed with gradient accumulation, a stage mini-batch the TTT layers were not built for).
    """
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    return prepare(cfg).run(Hardware(gpus, gpu_memory_gib, gpu_flops, mfu, overhead_gib, nodes, link_gbs, pcie_gbs))


# ---------------------------------------------------------------------------------------------
# the recall callback
# ---------------------------------------------------------------------------------------------
def recall_validation_cost(inputs: PlanInputs, hw: Hardware, frames: int, samples: int) -> tuple[float, float]:
    """(seconds, GiB) one GPU spends at each validation on the recall callback (``callbacks.recall``):
    every rank scores all ``samples`` held-out conversations of ``frames`` frames teacher-forced without
    grad, one at a time. Time: the forward FLOPs per frame, ``2 N_temporal + 2 N_head + 4 W_eff D`` per
    layer ``+`` depformer attention ``+`` the TTT layers' projections and memory, at ``mfu``. Memory beside
    the weights (training's activations are freed by then): the logits of one conversation in the compute
    dtype, ``a (E_text + E_audio)`` per frame, plus one temporal layer's intermediates ``S`` per frame."""
    sh, t = inputs.shape, inputs.ttt
    window = model_window(inputs.ttt_cfg, sh.num_layers, sh.context)
    chunk = inputs.ttt_cfg.get("attention_chunk_size")
    attention = 0.0
    for i in range(sh.num_layers):
        attention += attention_flops(effective_window(frames, layer_window(t, i, window, frames), chunk)[0], sh.dim)
    a = activation_bytes(model_dtype_bytes(inputs.model_cfg), inputs.strategy)
    return (compute_seconds(samples * frames, inference_flops(sh, t, attention), hw),
            scoring_peak_bytes(sh, a, frames) / GIB)
