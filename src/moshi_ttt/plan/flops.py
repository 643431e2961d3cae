"""FLOPs per frame of one sample, and the compute time they take.

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

Like nanoGPT's ``estimate_mfu``, each count is a small function of the shapes: 2 FLOPs per
multiply-add, the backward twice the forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moshi_ttt.plan.config import Hardware
    from moshi_ttt.plan.shapes import ModelShape, TTTShape


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def effective_window(T: int, window: int | None, chunk: int | None) -> tuple[float, int]:
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


def attention_flops(visited: float, dim: int) -> float:
    """Forward FLOPs per query of one attention layer: the scores q k^T and the weighted sum of the
    values, each a multiply-add (2 FLOPs) per key visited and channel, hence ``4 W_eff D``. The
    projections are matmul weights, counted in ``N``."""
    return 4 * visited * dim


# ---------------------------------------------------------------------------------------------
# the TTT memory
# ---------------------------------------------------------------------------------------------
def delta_rule_flops(head_dim: int, chunk: int) -> int:
    """Forward FLOPs per frame of one head of the chunkwise delta rule (keys K = d + 1 with the bias
    row, values V = d, chunks of C): the chunk's K K^T and Q K^T 4 C K, the triangular solve for
    [W | U0] C (K + V), and per chunk U = U0 - W S, Q S, K^T U (2 K V each) and (Q K^T) U 2 C V."""
    K, V, C = head_dim + 1, head_dim, chunk
    return 4 * C * K + C * (K + V) + 6 * K * V + 2 * C * V


def minibatch_gd_flops(inner: str, head_dim: int, hidden: int, mini_batch: int) -> int:
    """Forward FLOPs per token of one head of Sun et al.'s mini-batch gradient descent (head width d,
    mini-batch b): a linear memory uses its d x d weights three times per token (prediction, gradient,
    read: ``6 d^2``) plus the mini-batch's causal term ``4 b d``; an MLP memory (hidden m) ``14 d m``
    for its two d x m weights and the causal term on both widths, ``4 b m + 4 b d``."""
    d, m, b = head_dim, hidden, mini_batch
    return 6 * d * d + 4 * b * d if inner == "linear" else 14 * d * m + 4 * b * m + 4 * b * d


def ttt_inner_flops(rule: str, inner: str, heads: int, head_dim: int, hidden: int, mini_batch: int,
                    chunk: int) -> int:
    """Forward FLOPs of the TTT memory per token, all heads: the delta rule's per-chunk work
    (``delta_rule_flops``) or the mini-batch rule's (``minibatch_gd_flops``). The projections around it
    are matmul weights of the layer (``TTTShape.mm_per_layer``), counted apart."""
    if rule == "delta":
        return heads * delta_rule_flops(head_dim, chunk)
    return heads * minibatch_gd_flops(inner, head_dim, hidden, mini_batch)


def ttt_matmul_per_layer(ttt: TTTShape | None) -> int:
    """Matmul weights one TTT layer runs per token beside its base layer: its trainable projections
    and, for cache_replacement, the frozen in-projection it runs again for the memory."""
    return (ttt.mm_per_layer + ttt.extra_frozen_mm) if ttt else 0


def trainable_matmul(shape: ModelShape, ttt: TTTShape | None) -> int:
    """Matmul weights that get a weight gradient (LoRA's and the TTT layers' projections): each one
    costs a second 2 N in the backward, for dL/dW, besides the 2 N of the activation gradient."""
    return shape.lora_mm + (ttt.mm_per_layer * len(ttt.layers) if ttt else 0)


# ---------------------------------------------------------------------------------------------
# one training step's FLOPs per frame
# ---------------------------------------------------------------------------------------------
def forward_flops(shape: ModelShape, ttt: TTTShape | None, attention: Sequence[float], inner: int) -> float:
    """Forward FLOPs per frame: 2 per matmul weight (temporal layers, TTT projections, heads and
    depformer), every layer's attention (``attention``, per layer), the depformer's attention and each
    TTT layer's memory (``inner`` per layer)."""
    n = len(ttt.layers) if ttt else 0
    return (2 * (sum(shape.layer_mm) + ttt_matmul_per_layer(ttt) * n) + shape.head_mm_flops + sum(attention)
            + shape.dep_attention_flops + inner * n)


def backward_flops(shape: ModelShape, ttt: TTTShape | None, attention: Sequence[float], inner: int,
                   backward_layers: Sequence[int]) -> float:
    """Backward FLOPs per frame. Only the layers from the first trainable one (``backward_layers``)
    propagate a gradient, each at 2 per matmul weight (dL/dx), and so do the heads and depformer;
    trainable weights add 2 each for dL/dW; attention's backward is twice its forward (dq from the
    scores, dk and dv), and so is the memory's and the depformer attention's."""
    n = len(ttt.layers) if ttt else 0
    return (2 * (sum(shape.layer_mm[i] for i in backward_layers) + ttt_matmul_per_layer(ttt) * n)
            + shape.head_mm_flops + 2 * trainable_matmul(shape, ttt) + sum(2 * attention[i] for i in backward_layers)
            + 2 * shape.dep_attention_flops + 2 * inner * n)


def recompute_flops(shape: ModelShape, ttt: TTTShape | None, attention: Sequence[float], inner: int,
                    backward_layers: Sequence[int], checkpointing: bool) -> float:
    """FLOPs per frame run again for the backward, which the model FLOPs leave out but the GPU
    executes: the chunked attention recomputes its blocks (one attention forward per backward layer),
    a scan with checkpoint groups reruns its memory, ``model.gradient_checkpointing`` reruns the
    forward of every backward layer (matmuls, attention, TTT projections and memory), and a
    checkpointed depformer reruns the heads and its attention."""
    n = len(ttt.layers) if ttt else 0
    flops = sum(attention[i] for i in backward_layers)  # the chunked attention's block recompute
    flops += inner * n if ttt and ttt.group > 0 else 0  # the scan's group recompute
    if checkpointing:
        flops += sum(2 * shape.layer_mm[i] + attention[i] for i in backward_layers)
        flops += (2 * ttt_matmul_per_layer(ttt) + inner) * n
    if shape.dep_checkpointing:
        flops += shape.head_mm_flops + shape.dep_attention_flops
    return flops


def teacher_forward_flops(shape: ModelShape, visited: float) -> float:
    """FLOPs per frame of the teacher's forward (``loss.distill``): the frozen base alone - every
    temporal layer's matmuls, the heads and depformer, each layer's attention over the teacher's
    window (``visited`` keys per query) - with TTT off and no backward."""
    return (2 * sum(shape.layer_mm) + shape.head_mm_flops + attention_flops(visited, shape.dim) * shape.num_layers
            + shape.dep_attention_flops)


def inference_flops(shape: ModelShape, ttt: TTTShape | None, attention: float) -> float:
    """Forward FLOPs per frame without grad (the recall callback's teacher-forced scoring): the
    temporal matmuls, heads and depformer, the attention summed over layers (``attention``), and each
    TTT layer's projections and memory at its built mini-batch."""
    memory = (2 * ttt_matmul_per_layer(ttt) + ttt.inner_flops(ttt.mini_batch)) * len(ttt.layers) if ttt else 0
    return 2 * sum(shape.layer_mm) + shape.head_mm_flops + attention + shape.dep_attention_flops + memory


# ---------------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------------
def compute_seconds(frames: int, flops_per_frame: float, hw: Hardware) -> float:
    """Seconds one GPU computes ``frames`` frames at ``flops_per_frame``: the achieved rate is the
    peak times the assumed model FLOPs utilisation (``--mfu``), as nanoGPT's ``estimate_mfu`` relates
    them."""
    return frames * flops_per_frame / (hw.mfu * hw.gpu_flops)


def predicted_tokens_per_frame(dep_q: int) -> int:
    """Tokens the model predicts per frame: one text token and ``dep_q`` audio codebooks, the count
    the training logs' tokens/s use."""
    return 1 + dep_q
