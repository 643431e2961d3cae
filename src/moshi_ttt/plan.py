"""Per-GPU memory and throughput planner for a training config, stage by stage.

    python -m moshi_ttt.plan model=moshiko_7b curriculum=long_context trainer=deepspeed_zero3 --gpus 8

composes the same Hydra config as ``train.py`` (same groups, same overrides, from any working
directory), sizes the real model from its constructor on the ``meta`` device (no memory, no
download), and for every curriculum stage estimates what one GPU must hold and how fast it goes.
It prints one column per stage and exits non-zero, naming the stage, the GiB and the biggest
terms, when a stage cannot fit (exit 1) or the config cannot train at all (exit 2).

Memory model, per GPU, in bytes (``a`` = activation bytes: 2 when the module runs in bf16/fp16,
i.e. a 16-bit ``model.dtype`` or DeepSpeed with a 16-bit ``trainer.precision``; else 4.
``B`` micro-batch, ``T`` frames, ``D``/``H``/``hd`` model width / gating hidden width / head
width, ``W`` world size, ``Psi`` trainable parameters):

- base weights: frozen parameters x ``p`` bytes (``p`` = 2 under DeepSpeed bf16, else the
  model dtype), divided by ``W`` under ZeRO-3, zero on the GPU under ``offload_param``.
- ZeRO-3 gathered parameters: ``min(stage3_max_live_parameters, largest layer +
  stage3_prefetch_bucket_size) x p`` plus the persistent small tensors (fewer elements than
  ``stage3_param_persistence_threshold``), which stay whole on every GPU.
- trainable state (the ZeRO paper's accounting): DeepSpeed 16-bit: parameters 2 Psi, gradients
  2 Psi, AdamW 12 Psi (fp32 master + m + v); DeepSpeed fp32: 4 Psi, 4 Psi, 8 Psi. Stage >= 1
  shards the optimizer, >= 2 the gradients, 3 the parameters (each / W); ``offload_optimizer``
  moves the optimizer to CPU RAM. Without DeepSpeed nothing is cast: LoRA parameters keep the
  model dtype, TTT parameters stay fp32 (``install_ttt`` creates them so), AdamW keeps two states
  of the parameter's dtype, and DDP on W > 1 adds a gradient bucket copy.
- communication buffers (DeepSpeed): ``min(reduce_bucket_size, Psi)`` gradients, plus
  ``min(allgather_bucket_size, Psi)`` parameters below ZeRO-3.
- activations. Backward runs only from the first layer with a trainable parameter ``f`` onward
  (nothing below it needs a gradient), so with TTT in the last 3 of 32 layers only those layers,
  the output head and the depformer keep anything. Bytes saved for backward per token of one
  layer, counted with ``torch.autograd.graph.saved_tensors_hooks`` on the tiny model in bf16
  (frozen linears save no input; the two fp32 RMSNorms save 8 D each):

    temporal layer   ``S = 16 D + a (5 D + 3 H) + 4 hd + 8`` (+ LoRA: ``a (3 D + H) + 4 a r``)
    depformer layer  ``16 Dd + a (4 Dd + 3 Hd) + a dep_q + 4 heads_d + 8`` per depformer token
                     (``dep_q`` tokens per frame)
    TTT layer        ``(12 + 2 a) D + (28 + 2 a) I`` per token (I = heads x head_dim; the delta
                     rule: ``(12 + 2 a) D + (20 + 2 a) I + 40 heads``), plus one fp32 fast-weight
                     copy per scan checkpoint group: ``ceil(steps / G) x heads x fast_weight_size x 4``
                     per sample, steps = ``ceil(T / b)`` mini-batches or, for the delta rule, ``ceil(T / C)``
                     chunks (its state [d + 1, d] per head is the same size; every step's when ``G = 0``).

  (The per-token formulas are checked against ``saved_tensors_hooks`` in tests/test_plan.py.)

  With ``model.gradient_checkpointing`` (moshi's per-layer ``torch.utils.checkpoint``) a layer
  keeps only its input, ``a D`` per token, and the backward recomputes one layer at a time. The
  peak is ``kept + max(loss phase, backward phase)``:

    loss phase      depformer saved tensors (none but its inputs when it is checkpointed:
                    ``build_model`` checkpoints it with the transformer) + output norm ``8 D`` per
                    frame + logits: fp32 log-softmax saved for both heads ``4 (E_text + E_audio)``
                    + one head's backward ``(8 + 2 a) max(E_text, E_audio)`` per frame
                    (``E_text`` = text vocabulary, ``E_audio`` = dep_q x card).
    backward phase  the largest recomputed layer: ``S`` + gradient transients ``a (2 H + 3 D) + 8 D``
                    (fp32 dK/dV of the chunked attention) + one attention block
                    ``3 x B x heads x chunk x (W + chunk - 1) x 4`` + for a TTT layer its saved set
                    + ``16 I`` per token + ``(min(G, steps) + 2) x heads x fast_weight_size x 4``
                    per sample (the recomputed scan group's weights and two gradient copies).
  Without checkpointing every layer >= f keeps ``S`` (and TTT layers their saved set) and the
  backward phase is only the gradient transients.

- fixed overhead: CUDA context, NCCL buffers and allocator fragmentation, ``--overhead-gib``
  (default 3).
- ``loss.distill`` (in the stages whose distill weight is > 0): the teacher, the frozen base with
  the teacher's window, runs one no-grad forward before the student's and keeps only its outputs,
  ``a E`` per frame (``E`` = ``E_text + E_audio`` for ``target=logits``, ``D`` for ``hidden``),
  which live through the student's forward and loss: the loss phase adds them and the KL's fp32
  tensors ``12 E`` (``8 D`` for hidden). The teacher's own forward peaks at its outputs plus one
  layer's intermediates (at most a temporal layer's ``S`` + its attention block with the teacher's
  window, or a depformer layer's), before anything of the student exists; when that is the larger,
  the peak phase is ``teacher``.

Throughput model, FLOPs per frame of one sample (``N`` counts matmul weights, from the meta model):

    forward   2 N_temporal + 2 N_head + attention 4 W_eff D per layer + depformer attention
              4 dep_q Dd per depformer token and layer + TTT inner loop
    backward  2 N for activation gradients of the layers >= f and of the head and depformer,
              + 2 N_trainable for weight gradients, attention 8 W_eff D, TTT inner loop x 2
    recompute the forward of the checkpointed layers >= f, the chunked attention's own block
              recompute (4 W_eff D), the TTT scan's group recompute (inner loop x 1)

A teacher forward (``loss.distill``) adds ``2 N_temporal + 2 N_head + attention 4 W_teacher D`` per layer
+ depformer attention to both the model and the executed FLOPs of its stage (TTT off, no backward).

``W_eff`` = keys visited per query by the chunked local attention (window ``W`` = the stage's
attention_window, else ``ttt.attention_window``, else Moshi's context;
the window a variant fixes for its layers: hybrid's, cache_replacement's lag window), computed block by block like
``moshi_ttt.models.attention``. TTT inner loop per token and head: linear ``6 d^2 + 4 b d``;
mlp (hidden m) ``14 d m + 4 b m + 4 b d``; the delta rule (chunks of C, K = d + 1)
``4 C K + C (2 d + 1) + 6 K d + 2 C d`` (``delta_rule_flops``). "model FLOPs" exclude recompute; frames/s per GPU =
``mfu x gpu_flops / executed FLOPs`` (executed = model + recompute); tokens/s counts the
``1 + dep_q`` predicted tokens per frame, as the training logs do.

Communication per GPU and step, at ``--link-gbs`` (collectives) and ``--pcie-gbs`` (offload):
ZeRO-3 gathers every parameter for the forward and the layers >= f plus the head/depformer again
for recompute + backward ``(N_all + N_backward) p (W-1)/W`` and reduce-scatters ``Psi p (W-1)/W``;
ZeRO-0/1/2 and DDP move ``2 Psi p (W-1)/W``; offload_param moves ``(N_all + N_backward) p / W``
over PCIe, offload_optimizer ``Psi (4 + p) / W``. The step time is the largest of compute, link
and PCIe time (communication fully overlapped: a lower bound).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = float(2**30)
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def compose_config(overrides: list[str], config_dir: str | Path | None = None):
    """``conf/train.yaml`` composed with ``overrides``, exactly as ``train.py`` would see it (renamed keys
    moved to their new names, as ``train.py``'s validation moves them)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moshi_ttt.config.groups import apply_renames

    config_dir = Path(config_dir or DEFAULT_CONFIG_DIR).resolve()
    if not (config_dir / "train.yaml").exists():
        raise FileNotFoundError(f"--config-dir {config_dir}: no train.yaml there")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    apply_renames(cfg, list(overrides))
    return cfg


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    if node is None:
        return {}
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def lm_kwargs_for(model_cfg: dict) -> dict:
    """The LMModel constructor arguments of ``model``: ``lm_kwargs`` for a tiny model; a local
    directory's ``config.json`` when present; else Moshi 7B's built-in config (what moshi's
    loader uses for a hub repo without config.json), each with ``lm_kwargs`` on top."""
    from moshi.models import loaders

    source = model_cfg.get("source", "tiny")
    extra = dict(model_cfg.get("lm_kwargs") or {})
    if source == "tiny":
        if not extra:
            raise ValueError("model.source=tiny needs model.lm_kwargs")
        return extra
    if source == "dir" and model_cfg.get("path"):
        config_path = Path(model_cfg["path"]).expanduser() / "config.json"
        if config_path.exists():
            from moshi_ttt.models.loading import _NON_LM_KEYS

            raw = json.loads(config_path.read_text())
            return {**{k: v for k, v in raw.items() if k not in _NON_LM_KEYS}, **extra}
    return {**loaders._lm_kwargs, **extra}


# ---------------------------------------------------------------------------------------------
# model shape (exact, from the constructor on the meta device)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    dim: int
    num_layers: int
    num_heads: int
    hidden: int  # gating hidden width of a temporal layer
    context: int | None
    text_out: int
    card: int
    dep_q: int
    dep_dim: int
    dep_layers: int
    dep_heads: int
    dep_hidden: int
    dep_checkpointing: bool
    frozen: int  # every base parameter (LoRA's frozen_W included)
    lora: int  # LoRA A/B parameters
    lora_depformer: bool  # LoRA wraps the depformer too (model.lora.modules=all)
    lora_rank: int
    small_params: int  # elements in tensors below ZeRO-3's default persistence threshold
    layer_params: tuple[int, ...]  # all parameters of each temporal layer (with LoRA)
    layer_mm: tuple[int, ...]  # matmul weights of each temporal layer (with LoRA)
    lora_mm: int  # LoRA matmul weights (all of LoRA's parameters)
    head_mm_flops: int  # forward FLOPs per frame of text head, depformer_in, depformer, audio heads
    dep_attention_flops: int  # forward attention FLOPs per frame in the depformer
    lm_kwargs_json: str = ""  # the constructor arguments (ttt_shape builds the TTT layers into this model)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@contextlib.contextmanager
def _skip_init():
    """No-op ``torch.nn.init`` while building on the meta device: there are no values to fill, and
    tracing the meta kernels of the random initialisers costs seconds for the 7B."""
    import torch

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _meta_lm(kwargs: dict):
    """moshi's LMModel from its constructor on the meta device, every parameter frozen."""
    import torch
    from moshi.models.lm import LMModel

    with torch.device("meta"), _skip_init():
        model = LMModel(**{**kwargs, "device": "meta"})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@functools.lru_cache(maxsize=16)
def _model_shape(lm_kwargs_json: str, lora_rank: int, lora_modules: str, persistence: int) -> ModelShape:
    import torch

    from moshi_ttt.models.lora import apply_lora

    kwargs = json.loads(lm_kwargs_json)
    model = _meta_lm(kwargs)
    apply_lora(model, lora_rank, 2.0, lora_modules)

    def mm(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    def trainable(module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def first(module):
        return module[0] if isinstance(module, torch.nn.ModuleList) else module

    layers = model.transformer.layers
    layer0, dep = layers[0], model.depformer
    dep0 = dep.layers[0]
    dep_q, dep_dim = model.dep_q, dep0.self_attn.embed_dim
    # Per frame, each of the dep_q steps runs one weight set (weights_per_step) of every depformer
    # layer, one depformer_in projection and one audio head.
    dep_sets = len(dep0.self_attn.in_projs)
    head_flops = (2 * mm(model.text_linear) + 2 * mm(model.depformer_in) * dep_q // len(model.depformer_in)
                  + 2 * mm(dep) * dep_q // dep_sets + 2 * mm(model.linears))
    dep_attn = 4 * dep_q * dep_dim * dep_q * len(dep.layers)  # scores + values over <= dep_q keys, per frame
    total = sum(p.numel() for p in model.parameters())
    n_lora = trainable(model)
    return ModelShape(
        dim=model.dim,
        num_layers=len(layers),
        num_heads=layer0.self_attn.num_heads,
        hidden=first(layer0.gating).linear_out.in_features,
        context=kwargs.get("context"),
        text_out=model.text_linear.out_features,
        card=model.card,
        dep_q=dep_q,
        dep_dim=dep_dim,
        dep_layers=len(dep.layers),
        dep_heads=dep0.self_attn.num_heads,
        dep_hidden=first(dep0.gating).linear_out.in_features,
        dep_checkpointing=bool(dep.checkpointing),
        frozen=total - n_lora,
        lora=n_lora,
        lora_depformer=lora_modules == "all" and lora_rank > 0,
        lora_rank=lora_rank,
        small_params=sum(p.numel() for p in model.parameters() if p.numel() < persistence),
        layer_params=tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layer_mm=tuple(mm(layer) for layer in layers),
        lora_mm=n_lora,
        head_mm_flops=head_flops,
        dep_attention_flops=dep_attn,
        lm_kwargs_json=lm_kwargs_json,
    )


def model_shape(model_cfg: dict, persistence: int = 100_000) -> ModelShape:
    lora = model_cfg.get("lora") or {}
    kwargs = lm_kwargs_for(model_cfg)
    shape = _model_shape(json.dumps(kwargs, sort_keys=True), int(lora.get("rank", 0) or 0),
                         str(lora.get("modules", "transformer")), int(persistence))
    if model_cfg.get("gradient_checkpointing") and not shape.dep_checkpointing:
        shape = replace(shape, dep_checkpointing=True)  # build_model checkpoints the depformer too
    return shape


# ---------------------------------------------------------------------------------------------
# TTT shape (counted on the TTT layers install_ttt builds, on the meta device)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TTTShape:
    variant: str
    layers: tuple[int, ...]
    heads: int
    head_dim: int
    inner: str
    hidden: int  # MLP inner hidden width (0 for linear)
    mini_batch: int
    group: int  # scan checkpoint group (mini-batches, or the delta rule's chunks); 0 = none
    params_per_layer: int
    mm_per_layer: int  # matmul weights per TTT layer (trainable projections)
    extra_frozen_mm: int  # frozen matmul weights run again per TTT layer (cache_replacement's re-projection)
    windows: dict[int, int]  # attention window of the TTT layers whose variant fixes it (hybrid, cache_replacement)
    rule: str = "minibatch_gd"  # ttt.ttt_layer.rule
    chunk: int = 0  # the delta rule's chunk (frames)

    @property
    def inner_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def fast_weight(self) -> int:
        """Fast-weight elements of one head (one sample)."""
        d, m = self.head_dim, self.hidden
        return d * d + d if self.inner == "linear" else d * m + m + m * d + d

    @property
    def params(self) -> int:
        return self.params_per_layer * len(self.layers)

    def inner_flops(self, mini_batch: int) -> int:
        """Forward FLOPs of the memory per token, all heads (``mini_batch``: minibatch_gd's)."""
        if self.rule == "delta":
            return self.heads * delta_rule_flops(self.head_dim, self.chunk)
        d, m, b = self.head_dim, self.hidden, mini_batch
        per_head = 6 * d * d + 4 * b * d if self.inner == "linear" else 14 * d * m + 4 * b * m + 4 * b * d
        return self.heads * per_head

    def sequential_steps(self, frames: int, mini_batch: int) -> int:
        """Steps the memory takes one after the other over ``frames``: chunks (delta) or mini-batches."""
        return math.ceil(frames / (self.chunk if self.rule == "delta" else mini_batch))


def delta_rule_flops(head_dim: int, chunk: int) -> int:
    """Forward FLOPs per frame of one head of the chunkwise delta rule (keys K = d + 1 with the bias
    row, values V = d, chunks of C): the chunk's K K^T and Q K^T 4 C K, the triangular solve for
    [W | U0] C (K + V), and per chunk U = U0 - W S, Q S, K^T U (2 K V each) and (Q K^T) U 2 C V."""
    K, V, C = head_dim + 1, head_dim, chunk
    return 4 * C * K + C * (K + V) + 6 * K * V + 2 * C * V


def ttt_shape(ttt_cfg, shape: ModelShape) -> TTTShape | None:
    """The TTT layers ``install_ttt`` would add (``None`` for ``ttt.variant=none``), from the ``ttt``
    section read as ``install_ttt`` reads it: ``install_ttt`` itself puts the registered variant into
    ``shape``'s model built on the meta device (no memory, no values), and the variant counts each
    layer it built (``Variant.layer_shape``: new parameters, matmul weights, window, memory)."""
    from moshi_ttt.config.groups import ttt_dict
    from moshi_ttt.models.variants import NO_TTT, variant_class

    settings = ttt_dict(ttt_cfg)
    if settings["variant"] == NO_TTT:
        return None
    if not shape.lm_kwargs_json:
        raise ValueError("ttt_shape: the ModelShape has no lm_kwargs_json (make it with model_shape)")
    return _ttt_shape(shape.lm_kwargs_json, json.dumps(settings, sort_keys=True), variant_class(settings["variant"]))


@functools.lru_cache(maxsize=32)
def _ttt_shape(lm_kwargs_json: str, ttt_json: str, variant) -> TTTShape:
    import torch

    from moshi_ttt.models.insert import install_ttt, selected_layers

    settings = json.loads(ttt_json)
    model = _meta_lm(json.loads(lm_kwargs_json))
    with torch.device("meta"), _skip_init():
        modules = install_ttt(model, settings)
    layers = tuple(selected_layers(settings, len(model.transformer.layers)))
    shapes = [variant.layer_shape(model.transformer.layers[i], m) for i, m in zip(layers, modules)]
    first = shapes[0]
    if any(replace(s, window=None) != replace(first, window=None) for s in shapes[1:]):
        raise ValueError(f"ttt.variant={settings['variant']}: its layers differ in shape ({shapes}); the planner "
                         "counts one TTT layer shape")
    windows = {i: s.window for i, s in zip(layers, shapes) if s.window is not None}
    return TTTShape(settings["variant"], layers, first.heads, first.head_dim, first.inner, first.hidden,
                    first.mini_batch, first.group, first.params, first.matmul, first.frozen_matmul, windows,
                    first.rule, first.chunk)


# ---------------------------------------------------------------------------------------------
# strategy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    name: str
    deepspeed: bool
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    half: bool  # 16-bit compute (DeepSpeed casts the module to it)
    reduce_bucket: int = 200_000_000
    allgather_bucket: int = 200_000_000
    prefetch_bucket: int = 50_000_000
    max_live: int = 1_000_000_000
    persistence: int = 100_000


def strategy_from_config(trainer_cfg: dict) -> Strategy:
    strategy = trainer_cfg.get("strategy") or {}
    target = str(strategy.get("_target_", "")) if isinstance(strategy, dict) else str(strategy)
    precision = str(trainer_cfg.get("precision", "32-true"))
    half = "16" in precision.split("-")[0]
    if "DeepSpeed" not in target and "deepspeed" not in target:
        name = target.rsplit(".", 1)[-1] or "single device"
        return Strategy(name, False, 0, False, False, half)
    zero = (strategy.get("config") or {}).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))

    def offloaded(key: str) -> bool:
        device = (zero.get(key) or {}).get("device", "none")
        return str(device).lower() in ("cpu", "nvme")

    off_opt, off_param = offloaded("offload_optimizer"), offloaded("offload_param") and stage == 3
    name = f"DeepSpeed ZeRO-{stage}" + (" + offload" if off_opt or off_param else "")
    return Strategy(
        name, True, stage, off_opt, off_param, half,
        reduce_bucket=int(zero.get("reduce_bucket_size", 200_000_000)),
        allgather_bucket=int(zero.get("allgather_bucket_size", 200_000_000)),
        prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
        max_live=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
        persistence=int(zero.get("stage3_param_persistence_threshold", 100_000)),
    )


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    index: int
    name: str
    frames: int
    batch_size: int
    accumulate: int
    steps: int
    window: int | None
    ttt_mini_batch_size: int | None
    distill_weight: float = 0.0  # loss.distill's weight in the stage (> 0: a teacher forward every step)


def stages_from_config(cfg) -> list[StageSpec]:
    """The curriculum's stages, or the single stage ``data.seq_len x data.batch_size``."""
    from omegaconf import OmegaConf

    from moshi_ttt.training.curriculum import Curriculum

    weight = float(OmegaConf.select(cfg, "loss.distill.weight", default=0.0) or 0.0)
    curriculum = Curriculum.from_config(_plain(OmegaConf.select(cfg, "curriculum")))
    if curriculum:
        return [StageSpec(i, s.name, s.frames, s.batch_size, s.accumulate, s.steps, s.attention_window,
                          s.ttt_mini_batch_size, float(s.distill_weight if s.distill_weight is not None else weight))
                for i, s in enumerate(curriculum.stages)]
    return [StageSpec(0, "default", int(cfg.data.seq_len), int(cfg.data.batch_size),
                      int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches") or 1),
                      int(cfg.trainer.max_steps), None, None, weight)]


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


class PlanError(ValueError):
    """A config that cannot train at all (nothing trainable, a setting train.py refuses)."""


def _effective_window(T: int, window: int | None, chunk: int | None) -> tuple[float, int]:
    """(keys visited per query, chunk) of the chunked local attention, block by block as
    ``moshi_ttt.models.attention._Plan.blocks``: block [s, e) reads keys [max(0, s-W+1), e)."""
    from moshi_ttt.models.attention import default_chunk_size

    W = T if window is None else min(window, T)
    W = max(W, 1)
    c = chunk or default_chunk_size(W)
    visited = 0
    for start in range(0, T, c):
        end = min(start + c, T)
        visited += (end - start) * (end - max(0, start - W + 1))
    return visited / max(T, 1), c


@dataclass(frozen=True)
class Hardware:
    """The cluster the plan is for. ``link_gbs``: collective bus bandwidth per GPU in GB/s (None:
    300 within one node (NVLink), 40 across nodes (InfiniBand)); ``pcie_gbs``: host <-> GPU."""

    gpus: int = 8
    gpu_memory_gib: float = 80.0
    gpu_flops: float = 989e12
    mfu: float = 0.35
    overhead_gib: float = 3.0
    nodes: int = 1
    link_gbs: float | None = None
    pcie_gbs: float = 25.0

    @property
    def link(self) -> float:
        return self.link_gbs or (300.0 if self.nodes <= 1 else 40.0)


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


def temporal_layer_saved(D: int, H: int, hd: int, a: int, lora_rank: int = 0) -> int:
    """Bytes one temporal layer saves for backward per token (frozen weights, chunked local
    attention): two fp32 RMSNorms 16 D, q/k/v storage 3 a D, RoPE'd q and k 2 a D, gating 3 a H
    (linear_in output 2 H, activation output H), RoPE tables 4 hd, norm scales 8; LoRA adds its
    linears' inputs a (3 D + H) and the rank-r intermediates 4 a r."""
    saved = 16 * D + a * (5 * D + 3 * H) + 4 * hd + 8
    if lora_rank > 0:
        saved += a * (3 * D + H) + 4 * a * lora_rank
    return saved


def depformer_layer_saved(D: int, H: int, dep_q: int, heads: int, a: int, lora_rank: int = 0) -> int:
    """Bytes one depformer layer saves per depformer token (dep_q per frame): norms 16 D, SDPA
    q/k/v + output 4 a D, gating 3 a H, the causal mask row a dep_q, log-sum-exp 4 heads, norm
    scales 8 (+ LoRA as in ``temporal_layer_saved``)."""
    saved = 16 * D + a * (4 * D + 3 * H) + a * dep_q + 4 * heads + 8
    if lora_rank > 0:
        saved += a * (3 * D + H) + 4 * a * lora_rank
    return saved


def ttt_saved(D: int, inner_width: int, a: int, rule: str = "minibatch_gd", heads: int = 0) -> int:
    """Bytes a TTT layer's token streams save per token (I = inner width): its fp32 input norm
    8 D, the fp32 learning-rate projection input 4 D, the projections' and gate's inputs
    a (2 D + 2 I), and 28 I of fp32 streams (q and k cast and L2-normalised, the q/k/v blocks of
    the scan). The delta rule (H heads) keeps 20 I of fp32 streams instead (q and k normalised, then
    with their bias row, and v: its checkpoint groups keep their inputs only) and 40 H of per-head
    write strengths and their learning-rate path (calibrated, as the rest, in tests/test_plan.py)."""
    if rule == "delta":
        return (12 + 2 * a) * D + (20 + 2 * a) * inner_width + 40 * heads
    return (12 + 2 * a) * D + (28 + 2 * a) * inner_width


def plan_stages(shape: ModelShape, ttt: TTTShape | None, ttt_cfg: dict, model_cfg: dict, strategy: Strategy,
                stages: list[StageSpec], hw: Hardware, distill: dict | None = None) -> list[StagePlan]:
    n_ttt = ttt.params if ttt else 0
    psi = shape.lora + n_ttt
    if psi == 0:
        raise PlanError("nothing to train: model.lora.rank=0 and ttt.variant=none (train.py refuses this config); "
                        "choose ttt=<variant> or set model.lora.rank>0")
    if strategy.deepspeed and any(s.accumulate > 1 for s in stages):
        raise PlanError("curriculum.stages.*.accumulate > 1 is not supported with DeepSpeed (train.py refuses it): "
                        "use accumulate: 1 and more GPUs or a larger batch_size")
    if ttt:
        from moshi_ttt.ttt import check_stage_mini_batch

        for s in stages:
            try:
                check_stage_mini_batch(s.ttt_mini_batch_size, ttt.mini_batch, f"curriculum.stages.{s.index}.ttt_mini_batch_size")
            except ValueError as exn:
                raise PlanError(str(exn)) from exn

    W = hw.gpus
    if W < 1:
        raise PlanError(f"--gpus must be >= 1, got {W}")
    model_bytes = DTYPE_BYTES.get(str(model_cfg.get("dtype", "float32")), 4)
    half_act = model_bytes == 2 or (strategy.deepspeed and strategy.half)
    a = 2 if half_act else 4
    D, H, L, hd = shape.dim, shape.hidden, shape.num_layers, shape.head_dim

    # ---- weights and optimizer (bytes per GPU) -----------------------------------------------
    cpu = 0.0
    gathered = 0.0
    comm = 0.0
    if strategy.deepspeed:
        p = 2 if strategy.half else 4
        opt_per = 12 if strategy.half else 8
        base = shape.frozen * p
        tparams, grads, opt = psi * p, psi * p, psi * opt_per
        if strategy.zero_stage >= 1:
            opt /= W
        if strategy.zero_stage >= 2:
            grads /= W
        if strategy.zero_stage >= 3:
            base /= W
            tparams /= W
            largest = max(lp + (ttt.params_per_layer if ttt and i in ttt.layers else 0)
                          for i, lp in enumerate(shape.layer_params))
            gathered = (min(strategy.max_live, largest + strategy.prefetch_bucket) + shape.small_params) * p
        if strategy.offload_optimizer:
            cpu += opt + psi * 4 / W  # optimizer + fp32 gradient partition on CPU
            opt = 0.0
        if strategy.offload_param:
            cpu += base + tparams
            base, tparams = 0.0, 0.0
        comm = min(strategy.reduce_bucket, psi) * p
        if strategy.zero_stage < 3:
            comm += min(strategy.allgather_bucket, psi) * p
    else:
        base = shape.frozen * model_bytes
        lora_b = shape.lora * model_bytes
        ttt_b = n_ttt * 4  # install_ttt creates TTT parameters in fp32 and nothing casts them
        tparams, grads, opt = lora_b + ttt_b, lora_b + ttt_b, 2 * (lora_b + ttt_b)
        if W > 1:
            comm = lora_b + ttt_b  # DDP gradient buckets

    # ---- which layers run a backward --------------------------------------------------------
    lora_layers = range(L) if shape.lora_rank > 0 else range(0)
    trainable_layers = set(lora_layers) | set(ttt.layers if ttt else ())
    first = min(trainable_layers) if trainable_layers else L
    backward_layers = list(range(first, L))
    ckpt = bool(model_cfg.get("gradient_checkpointing"))
    lora_r = shape.lora_rank

    def layer_saved(i: int) -> float:
        return temporal_layer_saved(D, H, hd, a, lora_r)

    Dd, Hd, dq = shape.dep_dim, shape.dep_hidden, shape.dep_q
    dep_saved = depformer_layer_saved(Dd, Hd, dq, shape.dep_heads, a, lora_r if shape.lora_depformer else 0)
    grad_transient = a * (2 * H + 3 * D) + 8 * D
    dep_grad_transient = a * (2 * Hd + 3 * Dd) + 8 * Dd
    E_text, E_audio = shape.text_out, dq * shape.card

    base_window = ttt_cfg.get("attention_window")
    chunk = ttt_cfg.get("attention_chunk_size")
    ttt_layers = set(ttt.layers) if ttt else set()
    ttt_mm = (ttt.mm_per_layer + ttt.extra_frozen_mm) if ttt else 0  # per TTT layer
    trainable_mm = shape.lora_mm + (ttt.mm_per_layer * len(ttt.layers) if ttt else 0)

    # ---- communication per micro-batch (parameter gathers) and per step (gradients), bytes
    p_bytes = (2 if strategy.half else 4) if strategy.deepspeed else model_bytes
    outside = shape.frozen + shape.lora - sum(shape.layer_params)  # embeddings, heads, depformer
    n_forward = shape.frozen + shape.lora + n_ttt
    n_backward = sum(shape.layer_params[first:]) + n_ttt + outside  # re-gathered for recompute + backward
    gather_bytes = grad_bytes = pcie_param_bytes = pcie_opt_bytes = 0.0
    if strategy.deepspeed:
        if strategy.zero_stage >= 3:
            gather_bytes = (n_forward + n_backward) * p_bytes
            grad_bytes = psi * p_bytes  # reduce-scatter
        else:  # ZeRO-2: reduce-scatter + all-gather of the updated parameters; ZeRO-0/1: all-reduce
            grad_bytes = 2 * psi * p_bytes
        if strategy.offload_param:
            pcie_param_bytes = (n_forward + n_backward) * p_bytes / W
        if strategy.offload_optimizer:
            pcie_opt_bytes = psi * (4 + p_bytes) / W  # fp32 gradients down, updated parameters up
    elif W > 1:
        grad_bytes = 2 * (shape.lora * model_bytes + n_ttt * 4)  # DDP all-reduce

    plans = []
    for s in stages:
        T, B = s.frames, s.batch_size
        tokens = B * T
        win = s.window or base_window or shape.context
        # ---- attention: window, keys visited per query, chunk, block working set per layer
        attn_flops, attn_block = [], []
        for i in range(L):
            w = ttt.windows.get(i, win) if ttt else win
            w = T if w is None else min(int(w), T)
            visited, c = _effective_window(T, w, chunk)
            attn_flops.append(4 * visited * D)
            attn_block.append(3 * B * shape.num_heads * min(c, T) * (w + min(c, T) - 1) * 4)
        # ---- TTT scan memory: one layer's saved set, its backward transient
        ttt_set = ttt_bwd = 0.0
        inner = 0
        if ttt:
            b = s.ttt_mini_batch_size or ttt.mini_batch
            n_mb, G = ttt.sequential_steps(T, b), ttt.group
            state = ttt.heads * ttt.fast_weight * 4  # fp32 fast weights of one sample
            # kept: the scan's group inputs (one fast-weight copy per group), or every step's weights
            # without scan checkpointing; backward: the recomputed group's weights + 2 gradient copies
            kept_weights = math.ceil(n_mb / G) if G else n_mb
            ttt_set = ttt_saved(D, ttt.inner_width, a, ttt.rule, ttt.heads) * tokens + kept_weights * state * B
            ttt_bwd = 16 * ttt.inner_width * tokens + ((min(G, n_mb) if G else 0) + 2) * state * B
            inner = ttt.inner_flops(b)

        # ---- kept through the step / backward phase / loss phase
        working = {i: grad_transient * tokens + attn_block[i] + (layer_saved(i) * tokens if ckpt else 0.0)
                   for i in backward_layers}

        recompute = max(working.values(), default=0.0)
        if ckpt:  # the TTT set lives only while its layer is recomputed
            kept, ttt_kept = len(backward_layers) * a * D * tokens, 0.0
            work = [working[i] + (ttt_set + ttt_bwd if i in ttt_layers else 0.0) for i in backward_layers]
            backward_phase = max(work, default=0.0)
        else:  # every TTT layer keeps its set from its forward to its backward
            kept, ttt_kept = sum(layer_saved(i) for i in backward_layers) * tokens, len(ttt_layers) * ttt_set
            backward_phase = recompute + ttt_bwd
        ttt_term = ttt_kept + (ttt_set if ckpt and ttt else 0.0) + ttt_bwd
        dep_tokens = tokens * dq
        if shape.dep_checkpointing:
            dep = (shape.dep_layers * a * Dd + dep_saved + dep_grad_transient) * dep_tokens
        else:
            dep = (shape.dep_layers * dep_saved + dep_grad_transient) * dep_tokens
        dep += 8 * D * tokens  # the output norm's fp32 input
        logits = tokens * (4 * (E_text + E_audio) + (8 + 2 * a) * max(E_text, E_audio))
        loss_phase = dep + logits
        # ---- loss.distill: the teacher's forward runs first (no grad: one layer's intermediates at a
        # time), and only its outputs are kept, through the student's forward and loss
        teacher_out = teacher_loss = teacher_peak = teacher_flops = 0.0
        if s.distill_weight > 0:
            t_win = (distill or {}).get("teacher_window") or shape.context
            t_win = T if t_win is None else min(int(t_win), T)
            t_visited, t_chunk = _effective_window(T, t_win, chunk)
            t_block = 3 * B * shape.num_heads * min(t_chunk, T) * (t_win + min(t_chunk, T) - 1) * 4
            hidden = (distill or {}).get("target", "logits") == "hidden"
            width = D if hidden else E_text + E_audio
            teacher_out = a * width * tokens
            teacher_loss = teacher_out + (8 if hidden else 12) * width * tokens
            teacher_peak = teacher_out + max(temporal_layer_saved(D, H, hd, a) * tokens + t_block,
                                             dep_saved * tokens * dq)
            teacher_flops = (2 * sum(shape.layer_mm) + shape.head_mm_flops + 4 * t_visited * D * L
                             + shape.dep_attention_flops)
        act = kept + ttt_kept + max(loss_phase + teacher_loss, backward_phase)
        phase = "loss" if loss_phase + teacher_loss >= backward_phase else "backward"
        if teacher_peak > act:
            act, phase = teacher_peak, "teacher"

        # ---- FLOPs per frame of one sample
        fwd = (2 * (sum(shape.layer_mm) + ttt_mm * len(ttt_layers)) + shape.head_mm_flops + sum(attn_flops)
               + shape.dep_attention_flops + inner * len(ttt_layers))
        bwd = (2 * (sum(shape.layer_mm[i] for i in backward_layers) + ttt_mm * len(ttt_layers))
               + shape.head_mm_flops + 2 * trainable_mm + sum(2 * attn_flops[i] for i in backward_layers)
               + 2 * shape.dep_attention_flops + 2 * inner * len(ttt_layers))
        model_flops = fwd + bwd
        recompute_flops = sum(attn_flops[i] for i in backward_layers)  # the chunked attention's block recompute
        recompute_flops += inner * len(ttt_layers) if ttt and ttt.group > 0 else 0  # the scan's group recompute
        if ckpt:
            recompute_flops += sum(2 * shape.layer_mm[i] + attn_flops[i] for i in backward_layers)
            recompute_flops += (2 * ttt_mm + inner) * len(ttt_layers)
        if shape.dep_checkpointing:
            recompute_flops += shape.head_mm_flops + shape.dep_attention_flops
        model_flops += teacher_flops
        executed = model_flops + recompute_flops
        compute = s.accumulate * B * T * executed / (hw.mfu * hw.gpu_flops)
        link_bytes = (s.accumulate * gather_bytes + grad_bytes) * (W - 1) / W
        pcie = s.accumulate * pcie_param_bytes + pcie_opt_bytes
        times = {"compute": compute, "link": link_bytes / (hw.link * 1e9), "PCIe": pcie / (hw.pcie_gbs * 1e9)}
        bound = max(times, key=times.get)
        step = times[bound]
        fps = s.accumulate * B * T / step
        total = base + gathered + tparams + grads + opt + comm + act + hw.overhead_gib * GIB
        plans.append(StagePlan(
            index=s.index, name=s.name, frames=T, batch_size=B, accumulate=s.accumulate, steps=s.steps,
            window=min(int(win), T) if win else T, world_size=W, strategy=strategy.name,
            base_weights=base / GIB, gathered_params=gathered / GIB, trainable_params=tparams / GIB,
            gradients=grads / GIB, optimizer=opt / GIB, comm_buffers=comm / GIB, layer_inputs=kept / GIB,
            layer_recompute=recompute / GIB, ttt=ttt_term / GIB, depformer=dep / GIB, logits=logits / GIB,
            activations=act / GIB, activation_phase=phase, overhead=hw.overhead_gib, total=total / GIB,
            available=float(hw.gpu_memory_gib), cpu_offload=cpu / GIB, model_flops_per_frame=model_flops,
            executed_flops_per_frame=executed, frames_per_s_gpu=fps, tokens_per_s_total=fps * W * (1 + dq),
            comm_gb=link_bytes / 1e9, pcie_gb=pcie / 1e9, compute_time_s=compute, step_time_s=step,
            bound=bound, stage_time_s=step * s.steps,
            counts={"frozen": shape.frozen, "lora": shape.lora, "ttt": n_ttt, "trainable": psi,
                    "first_backward_layer": first, "activation_bytes": a},
            distill_weight=s.distill_weight, teacher=teacher_loss / GIB, teacher_forward=teacher_peak / GIB,
            teacher_flops_per_frame=teacher_flops,
            teacher_time_s=s.accumulate * B * T * teacher_flops / (hw.mfu * hw.gpu_flops),
        ))
    return plans


# ---------------------------------------------------------------------------------------------
# what would fit instead
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


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
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


def recall_validation_cost(inputs: PlanInputs, hw: Hardware, frames: int, samples: int) -> tuple[float, float]:
    """(seconds, GiB) one GPU spends at each validation on the recall callback (``callbacks.recall``):
    every rank scores all ``samples`` held-out conversations of ``frames`` frames teacher-forced without
    grad, one at a time. Time: the forward FLOPs per frame, ``2 N_temporal + 2 N_head + 4 W_eff D`` per
    layer ``+`` depformer attention ``+`` the TTT layers' projections and memory, at ``mfu``. Memory beside
    the weights (training's activations are freed by then): the logits of one conversation in the compute
    dtype, ``a (E_text + E_audio)`` per frame, plus one temporal layer's intermediates ``S`` per frame."""
    sh, t, cfg = inputs.shape, inputs.ttt, inputs.ttt_cfg
    window = cfg.get("attention_window") or sh.context
    attention = 0.0
    for i in range(sh.num_layers):
        w = t.windows.get(i, window) if t else window
        attention += 4 * _effective_window(frames, None if w is None else min(int(w), frames),
                                           cfg.get("attention_chunk_size"))[0] * sh.dim
    memory = (2 * (t.mm_per_layer + t.extra_frozen_mm) + t.inner_flops(t.mini_batch)) * len(t.layers) if t else 0
    flops = 2 * sum(sh.layer_mm) + sh.head_mm_flops + attention + sh.dep_attention_flops + memory
    a = 2 if DTYPE_BYTES.get(str(inputs.model_cfg.get("dtype", "float32")), 4) == 2 or (
        inputs.strategy.deepspeed and inputs.strategy.half) else 4
    peak = frames * (a * (sh.text_out + sh.dep_q * sh.card) + temporal_layer_saved(sh.dim, sh.hidden, sh.head_dim, a))
    return samples * frames * flops / (hw.mfu * hw.gpu_flops), peak / GIB


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


def _default_gpus(cfg, nodes: int | None) -> tuple[int, int]:
    from omegaconf import OmegaConf

    devices = OmegaConf.select(cfg, "trainer.devices")
    num_nodes = nodes or OmegaConf.select(cfg, "trainer.num_nodes") or 1
    per_node = devices if isinstance(devices, int) and devices > 0 else 8
    return int(per_node) * int(num_nodes), int(num_nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_ttt.plan",
        description="Per-GPU memory and throughput of every curriculum stage of a train.py config (same "
                    "Hydra overrides as train.py). Exit 1 when a stage does not fit, 2 when the config "
                    "cannot train.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=moshiko_7b trainer=deepspeed_zero3")
    parser.add_argument("--gpus", type=int, default=None,
                        help="world size (default: trainer.devices x nodes when devices > 0, else 8 per node)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--gpu-flops", type=float, default=989e12,
                        help="peak dense bf16 FLOP/s of one GPU (default 989e12, H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of the peak achieved (default 0.35)")
    parser.add_argument("--overhead-gib", type=float, default=3.0,
                        help="CUDA context + NCCL + allocator fragmentation per GPU (default 3)")
    parser.add_argument("--link-gbs", type=float, default=None,
                        help="collective bandwidth per GPU, GB/s (default 300 on one node, 40 across nodes)")
    parser.add_argument("--pcie-gbs", type=float, default=25.0, help="host <-> GPU bandwidth for offload (default 25)")
    parser.add_argument("--config-dir", default=None, help=f"Hydra config dir (default {DEFAULT_CONFIG_DIR})")
    parser.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(args.overrides, args.config_dir)
        gpus, nodes = _default_gpus(cfg, args.nodes)
        hw = Hardware(args.gpus or gpus, args.gpu_memory_gib, args.gpu_flops, args.mfu, args.overhead_gib, nodes,
                      args.link_gbs, args.pcie_gbs)
        inputs = prepare(cfg)
        plans = inputs.run(hw)
    except (PlanError, ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as exn:
        print(f"plan: cannot plan this config: {str(exn).splitlines()[0] if str(exn) else type(exn).__name__}",
              file=sys.stderr)
        return 2
    print(render(plans, describe(inputs, plans, hw), rich=False if args.plain else None), end="")
    print(_describe_recall(cfg, inputs, plans, hw), end="")
    sys.stdout.flush()
    failing = [p for p in plans if not p.fits]
    if not failing:
        tight = min(plans, key=lambda p: p.headroom)
        total_time = sum(p.stage_time_s for p in plans)
        print(f"verdict: fits. Tightest stage {tight.index} '{tight.name}': {tight.total:.1f} of {tight.available:g} "
              f"GiB ({tight.headroom:.1f} GiB headroom). All stages: {_duration(total_time)}.")
        if tight.headroom < 0.1 * tight.available:
            print(f"warning: stage {tight.index} '{tight.name}' has less than 10% headroom; the estimate's error can "
                  "exceed that. Consider: " + "; ".join(suggestions(inputs, tight, hw)[:3]))
        return 0
    for p in failing:
        terms = ", ".join(f"{k} {v:.1f}" for k, v in p.biggest())
        print(f"verdict: DOES NOT FIT. Stage {p.index} '{p.name}' ({p.frames} frames x batch {p.batch_size}) needs "
              f"{p.total:.1f} GiB per GPU, {p.available:g} GiB available ({-p.headroom:.1f} GiB over); biggest "
              f"terms (GiB): {terms}.", file=sys.stderr)
        tips = suggestions(inputs, p, hw)
        if tips:
            print("  try: " + "; ".join(tips), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
