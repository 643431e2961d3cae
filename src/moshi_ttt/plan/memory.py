"""Memory per GPU: weights, optimizer, buffers and activations, one named formula each.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moshi_ttt.plan.config import Strategy
    from moshi_ttt.plan.shapes import ModelShape, TTTShape


# ---------------------------------------------------------------------------------------------
# element sizes and what trains
# ---------------------------------------------------------------------------------------------
def activation_bytes(model_bytes: int, strategy: Strategy) -> int:
    """``a``, bytes of one activation element: 2 when the module computes in 16 bits - a 16-bit
    ``model.dtype``, or DeepSpeed, which casts the whole module to a 16-bit ``trainer.precision`` -
    else 4."""
    return 2 if model_bytes == 2 or (strategy.deepspeed and strategy.half) else 4


def trainable_params(shape: ModelShape, ttt: TTTShape | None) -> int:
    """``Psi``: the parameters that train, LoRA's and the TTT layers'; every other one is frozen."""
    return shape.lora + (ttt.params if ttt else 0)


def first_backward_layer(shape: ModelShape, ttt: TTTShape | None) -> int:
    """``f``, the first temporal layer with a trainable parameter (every layer under LoRA, else the
    first TTT layer; the number of layers when none): nothing below it needs a gradient, so autograd
    saves nothing there and the backward stops at it."""
    lora_layers = range(shape.num_layers) if shape.lora_rank > 0 else range(0)
    trainable_layers = set(lora_layers) | set(ttt.layers if ttt else ())
    return min(trainable_layers) if trainable_layers else shape.num_layers


# ---------------------------------------------------------------------------------------------
# weights, gradients, optimizer, buffers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightMemory:
    """Bytes one GPU holds for the weights and their training state (``cpu``: the CPU RAM of one
    GPU's process under DeepSpeed's offload)."""

    base: float  # frozen weights
    gathered: float  # ZeRO-3's gathered (unsharded) parameters in flight
    params: float  # trainable parameters
    grads: float
    optimizer: float
    comm: float  # communication buffers
    cpu: float = 0.0


def deepspeed_parameter_bytes(strategy: Strategy) -> int:
    """``p`` under DeepSpeed: it casts the module, frozen and trainable parameters alike, to the
    compute precision, 2 bytes under bf16/fp16 and 4 under fp32."""
    return 2 if strategy.half else 4


def optimizer_bytes_per_param(strategy: Strategy) -> int:
    """AdamW's bytes per trainable parameter under DeepSpeed (the ZeRO paper's K): mixed precision
    keeps an fp32 master copy beside m and v (12); in fp32 the parameter is its own master (8)."""
    return 12 if strategy.half else 8


def largest_layer_params(shape: ModelShape, ttt: TTTShape | None) -> int:
    """Parameters of the largest temporal layer, its TTT layer included: the most ZeRO-3 must
    gather at once to run one layer."""
    return max(lp + (ttt.params_per_layer if ttt and i in ttt.layers else 0)
               for i, lp in enumerate(shape.layer_params))


def zero3_gathered_bytes(shape: ModelShape, ttt: TTTShape | None, strategy: Strategy, p: int) -> int:
    """ZeRO-3's unsharded parameters on a GPU at once: the layer running plus the prefetched bucket,
    capped by ``stage3_max_live_parameters``, and the small tensors below
    ``stage3_param_persistence_threshold`` that it never shards."""
    largest = largest_layer_params(shape, ttt)
    return (min(strategy.max_live, largest + strategy.prefetch_bucket) + shape.small_params) * p


def deepspeed_comm_buffer_bytes(psi: int, strategy: Strategy, p: int) -> int:
    """DeepSpeed's flat communication buffers: one reduce bucket of gradients (at most ``Psi``) and,
    below ZeRO-3, one all-gather bucket for the updated parameters."""
    comm = min(strategy.reduce_bucket, psi) * p
    if strategy.zero_stage < 3:
        comm += min(strategy.allgather_bucket, psi) * p
    return comm


def zero_memory(shape: ModelShape, ttt: TTTShape | None, strategy: Strategy, world: int) -> WeightMemory:
    """Weights and training state under DeepSpeed, the ZeRO paper's accounting: ``p Psi`` parameters,
    ``p Psi`` gradients, ``K Psi`` optimizer; stage >= 1 shards the optimizer over the ``world``
    GPUs, >= 2 the gradients too, 3 the parameters, frozen ones included (and adds what it gathers)."""
    psi = trainable_params(shape, ttt)
    p = deepspeed_parameter_bytes(strategy)
    base = shape.frozen * p
    params, grads, opt = psi * p, psi * p, psi * optimizer_bytes_per_param(strategy)
    gathered = 0.0
    if strategy.zero_stage >= 1:
        opt /= world
    if strategy.zero_stage >= 2:
        grads /= world
    if strategy.zero_stage >= 3:
        base /= world
        params /= world
        gathered = zero3_gathered_bytes(shape, ttt, strategy, p)
    memory = WeightMemory(base, gathered, params, grads, opt, deepspeed_comm_buffer_bytes(psi, strategy, p))
    return zero_offload(memory, psi, strategy, world)


def zero_offload(memory: WeightMemory, psi: int, strategy: Strategy, world: int) -> WeightMemory:
    """DeepSpeed's offload moves state to CPU RAM: ``offload_optimizer`` the optimizer and its fp32
    gradient partition (``4 Psi / W``), ``offload_param`` (ZeRO-3) the parameter shards."""
    cpu, base, params, opt = 0.0, memory.base, memory.params, memory.optimizer
    if strategy.offload_optimizer:
        cpu += opt + psi * 4 / world  # optimizer + fp32 gradient partition on CPU
        opt = 0.0
    if strategy.offload_param:
        cpu += base + params
        base, params = 0.0, 0.0
    return replace(memory, base=base, params=params, optimizer=opt, cpu=cpu)


def native_trainable_bytes(lora: int, n_ttt: int, model_bytes: int) -> int:
    """Bytes of the trainable parameters without DeepSpeed, where nothing casts them: LoRA's keep the
    model dtype, the TTT layers' stay fp32 (``install_ttt`` creates them so)."""
    return lora * model_bytes + n_ttt * 4


def native_memory(shape: ModelShape, ttt: TTTShape | None, model_bytes: int, world: int) -> WeightMemory:
    """Weights and training state without DeepSpeed (one device or DDP): the base in the model dtype,
    the trainable parameters, their gradients of the same size, AdamW's two states of the parameter's
    dtype, and on more than one GPU DDP's gradient buckets, one more gradient copy."""
    trainable = native_trainable_bytes(shape.lora, ttt.params if ttt else 0, model_bytes)
    return WeightMemory(shape.frozen * model_bytes, 0.0, trainable, trainable, 2 * trainable,
                        trainable if world > 1 else 0.0)


def weight_memory(shape: ModelShape, ttt: TTTShape | None, strategy: Strategy, model_bytes: int,
                  world: int) -> WeightMemory:
    """Weights, gradients, optimizer and buffers per GPU, as the strategy lays them out."""
    if strategy.deepspeed:
        return zero_memory(shape, ttt, strategy, world)
    return native_memory(shape, ttt, model_bytes, world)


# ---------------------------------------------------------------------------------------------
# bytes saved for backward, per token (calibrated with saved_tensors_hooks in tests/test_plan.py)
# ---------------------------------------------------------------------------------------------
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


def temporal_saved(shape: ModelShape, a: int) -> int:
    """``S``, bytes a temporal layer of this model saves per token (with its LoRA, if any)."""
    return temporal_layer_saved(shape.dim, shape.hidden, shape.head_dim, a, shape.lora_rank)


def depformer_saved(shape: ModelShape, a: int) -> int:
    """Bytes a depformer layer of this model saves per depformer token (with LoRA when
    ``model.lora.modules=all`` wraps the depformer too)."""
    return depformer_layer_saved(shape.dep_dim, shape.dep_hidden, shape.dep_q, shape.dep_heads, a,
                                 shape.lora_rank if shape.lora_depformer else 0)


# ---------------------------------------------------------------------------------------------
# the backward phase: one layer recomputed at a time
# ---------------------------------------------------------------------------------------------
def gradient_transient_bytes(D: int, H: int, a: int) -> int:
    """Bytes per token a layer's backward allocates on top of what it saved: gradient transients in
    the compute dtype, ``a (2 H + 3 D)`` (two of the gating's hidden width, three of the model's), and
    the chunked attention's fp32 dK/dV, ``8 D``."""
    return a * (2 * H + 3 * D) + 8 * D


def attention_block_bytes(batch: int, heads: int, chunk: int, window: int, frames: int) -> int:
    """Bytes of one block of the chunked local attention, which its backward recomputes: three fp32
    tensors the size of the block's scores (3 x 4 bytes), every head, each of ``chunk`` queries against
    the ``window + chunk - 1`` keys the block reads."""
    c = min(chunk, frames)
    return 3 * batch * heads * c * (window + c - 1) * 4


def layer_backward_bytes(transient: int, block: int, saved: int, tokens: int, checkpointing: bool) -> float:
    """The backward phase of one temporal layer: its gradient transients and attention block, and,
    under ``model.gradient_checkpointing``, the saved set it has just recomputed (without
    checkpointing the saved set is kept since the forward and counted there)."""
    return transient * tokens + block + (saved * tokens if checkpointing else 0.0)


# ---------------------------------------------------------------------------------------------
# the TTT scan
# ---------------------------------------------------------------------------------------------
def fast_weight_state_bytes(ttt: TTTShape) -> int:
    """Bytes of one sample's fast weights, every head: the memory runs in fp32."""
    return ttt.heads * ttt.fast_weight * 4


def scan_checkpoints(steps: int, group: int) -> int:
    """Fast-weight copies the scan keeps for its backward: one per checkpoint group of ``group``
    steps (each group is recomputed from its first state), every step's without groups (0)."""
    return math.ceil(steps / group) if group else steps


def ttt_scan_saved_bytes(ttt: TTTShape, D: int, a: int, frames: int, batch: int) -> int:
    """What one TTT layer's scan saves for backward: its token streams (``ttt_saved`` per token) and
    its checkpointed fast weights (``scan_checkpoints`` copies per sample). The steps are the
    memory's sequential ones, chunks (delta) or mini-batches of the size the layers were built with,
    the only one a stage may ask for (``check_stage_mini_batch``)."""
    steps = ttt.sequential_steps(frames, ttt.mini_batch)
    state = fast_weight_state_bytes(ttt)
    tokens = batch * frames
    return ttt_saved(D, ttt.inner_width, a, ttt.rule, ttt.heads) * tokens + scan_checkpoints(steps, ttt.group) * state * batch


def ttt_scan_backward_bytes(ttt: TTTShape, frames: int, batch: int) -> int:
    """What one TTT layer's scan adds while it runs its backward: ``16 I`` per token of fp32 gradient
    streams and, per sample, the recomputed group's fast weights (``min(G, steps)`` states) and two
    gradient copies of the state."""
    steps, group = ttt.sequential_steps(frames, ttt.mini_batch), ttt.group
    state = fast_weight_state_bytes(ttt)
    tokens = batch * frames
    return 16 * ttt.inner_width * tokens + ((min(group, steps) if group else 0) + 2) * state * batch


# ---------------------------------------------------------------------------------------------
# kept through the step, backward phase, loss phase
# ---------------------------------------------------------------------------------------------
def kept_layer_bytes(backward_layers: int, saved: int, a: int, D: int, tokens: int, checkpointing: bool) -> int:
    """Bytes the ``backward_layers`` temporal layers keep from their forward to their backward:
    checkpointed, each keeps only its input (``a D`` per token); otherwise its saved set ``S``."""
    if checkpointing:
        return backward_layers * a * D * tokens
    return backward_layers * saved * tokens


def kept_ttt_bytes(ttt_layers: int, scan_saved: float, checkpointing: bool) -> float:
    """Bytes the TTT scans keep through the step: each TTT layer's saved set from its forward to its
    backward, none under checkpointing (the set lives only while its layer is recomputed)."""
    return 0.0 if checkpointing else ttt_layers * scan_saved


def backward_phase_bytes(working: Mapping[int, float], ttt_layers: set[int], scan_saved: float,
                         scan_backward: float, checkpointing: bool) -> float:
    """The backward phase's peak on top of what is kept: under checkpointing, the largest layer
    being recomputed (``working``) with, for a TTT layer, its recomputed scan set and the scan's
    backward; without, the largest layer's transients plus a scan's backward."""
    if checkpointing:
        return max((working[i] + (scan_saved + scan_backward if i in ttt_layers else 0.0) for i in working),
                   default=0.0)
    return max(working.values(), default=0.0) + scan_backward


def ttt_scan_term_bytes(kept: float, scan_saved: float, scan_backward: float, checkpointing: bool) -> float:
    """The plan's "TTT scan" row: the scan sets kept through the step, or under checkpointing the one
    being recomputed, plus one scan's backward."""
    return kept + (scan_saved if checkpointing else 0.0) + scan_backward


def depformer_loss_bytes(shape: ModelShape, a: int, tokens: int) -> int:
    """The depformer's part of the loss phase, per frame ``dep_q`` depformer tokens: checkpointed, each
    layer keeps its input (``a Dd``) and one layer at a time is recomputed; otherwise every layer keeps
    its saved set; plus one layer's gradient transients, and the output norm's fp32 input (``8 D``
    per frame) that feeds it."""
    dep_tokens = tokens * shape.dep_q
    saved, transient = depformer_saved(shape, a), gradient_transient_bytes(shape.dep_dim, shape.dep_hidden, a)
    if shape.dep_checkpointing:
        dep = (shape.dep_layers * a * shape.dep_dim + saved + transient) * dep_tokens
    else:
        dep = (shape.dep_layers * saved + transient) * dep_tokens
    return dep + 8 * shape.dim * tokens


def logits_loss_bytes(shape: ModelShape, a: int, tokens: int) -> int:
    """The logits' part of the loss phase: the cross-entropy saves fp32 log-softmax of both heads
    (``4 (E_text + E_audio)`` per frame, ``E_audio`` = dep_q x card), and the backward runs one head at
    a time, ``(8 + 2 a)`` bytes per logit of the larger head (fp32 transients and a compute-dtype
    gradient)."""
    text, audio = shape.text_out, shape.dep_q * shape.card
    return tokens * (4 * (text + audio) + (8 + 2 * a) * max(text, audio))


# ---------------------------------------------------------------------------------------------
# loss.distill: the teacher
# ---------------------------------------------------------------------------------------------
def teacher_output_width(shape: ModelShape, target: str) -> int:
    """Elements per frame the teacher hands the student: the hidden state (``D``) for
    ``target=hidden``, else the text and audio logits (``E_text + E_audio``)."""
    return shape.dim if target == "hidden" else shape.text_out + shape.dep_q * shape.card


def teacher_outputs_bytes(width: int, a: int, tokens: int) -> int:
    """The teacher's outputs, kept in the compute dtype from its forward through the student's
    forward and loss: all it keeps."""
    return a * width * tokens


def teacher_loss_bytes(outputs: int, width: int, tokens: int, target: str) -> int:
    """What the teacher adds to the loss phase: its outputs and the distillation loss's fp32 tensors,
    12 bytes per logit for the KL, 8 per hidden element for the MSE of ``target=hidden``."""
    return outputs + (8 if target == "hidden" else 12) * width * tokens


def teacher_forward_peak_bytes(shape: ModelShape, a: int, tokens: int, block: int, outputs: int) -> int:
    """The peak of the teacher's own no-grad forward, run before anything of the student exists:
    its outputs plus one layer's intermediates at a time, a temporal layer's (``S`` without LoRA,
    and its attention block over the teacher's window) or a depformer layer's."""
    temporal = temporal_layer_saved(shape.dim, shape.hidden, shape.head_dim, a) * tokens + block
    return outputs + max(temporal, depformer_saved(shape, a) * tokens * shape.dep_q)


# ---------------------------------------------------------------------------------------------
# the peak
# ---------------------------------------------------------------------------------------------
def activation_peak(kept: float, ttt_kept: float, loss_phase: float, teacher_loss: float, backward_phase: float,
                    teacher_forward: float) -> tuple[float, str]:
    """(bytes, phase) of the activations' peak: what is kept through the step plus the larger of the
    loss phase (with the teacher's outputs and loss) and the backward phase, unless the teacher's own
    forward, which comes first and keeps nothing else, is larger."""
    peak = kept + ttt_kept + max(loss_phase + teacher_loss, backward_phase)
    phase = "loss" if loss_phase + teacher_loss >= backward_phase else "backward"
    if teacher_forward > peak:
        return teacher_forward, "teacher"
    return peak, phase


def total_bytes(weights: WeightMemory, activations: float, overhead: float) -> float:
    """Everything one GPU holds: weights, gathered parameters, trainable state, buffers, the
    activations' peak and the fixed overhead (CUDA context, NCCL, allocator fragmentation)."""
    return (weights.base + weights.gathered + weights.params + weights.grads + weights.optimizer + weights.comm
            + activations + overhead)



def scoring_peak_bytes(shape: ModelShape, a: int, frames: int) -> int:
    """Activations of a no-grad forward over one conversation of ``frames`` frames (the recall
    callback's scoring): nothing is saved for a backward, so the peak is its logits in the compute
    dtype and one temporal layer's intermediates at a time (``S`` without LoRA)."""
    return frames * (a * (shape.text_out + shape.dep_q * shape.card)
                     + temporal_layer_saved(shape.dim, shape.hidden, shape.head_dim, a))
