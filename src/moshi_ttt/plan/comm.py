"""Communication per GPU and step, and the step time it bounds.

Communication per GPU and step, at ``--link-gbs`` (collectives) and ``--pcie-gbs`` (offload):
ZeRO-3 gathers every parameter for the forward and the layers >= f plus the head/depformer again
for recompute + backward ``(N_all + N_backward) p (W-1)/W`` and reduce-scatters ``Psi p (W-1)/W``;
ZeRO-0/1/2 and DDP move ``2 Psi p (W-1)/W``; offload_param moves ``(N_all + N_backward) p / W``
over PCIe, offload_optimizer ``Psi (4 + p) / W``. The step time is the largest of compute, link
and PCIe time (communication fully overlapped: a lower bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moshi_ttt.plan.memory import deepspeed_parameter_bytes, native_trainable_bytes, trainable_params

if TYPE_CHECKING:
    from moshi_ttt.plan.config import Hardware, Strategy
    from moshi_ttt.plan.shapes import ModelShape, TTTShape


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU moves: per micro-batch (``gather``, ``pcie_params``) and per optimizer step
    (``gradients``, ``pcie_optimizer``), before the ``(W-1)/W`` of a ring collective."""

    gather: float = 0.0  # ZeRO-3 parameter all-gathers
    gradients: float = 0.0  # gradient reduce(-scatter) / all-reduce, and ZeRO-2's parameter all-gather
    pcie_params: float = 0.0  # offload_param: parameters up from CPU RAM
    pcie_optimizer: float = 0.0  # offload_optimizer: fp32 gradients down, updated parameters up


def parameter_bytes(strategy: Strategy, model_bytes: int) -> int:
    """Bytes per parameter on the wire: DeepSpeed's compute precision, else the model dtype."""
    return deepspeed_parameter_bytes(strategy) if strategy.deepspeed else model_bytes


def gathered_parameters(shape: ModelShape, ttt: TTTShape | None, first: int) -> int:
    """Parameters ZeRO-3 gathers per micro-batch: all of them for the forward, and again those the
    backward needs - the layers from ``first`` on, the TTT layers, the embeddings, heads and
    depformer - for the recompute and the backward (it frees each after use)."""
    n_ttt = ttt.params if ttt else 0
    outside = shape.frozen + shape.lora - sum(shape.layer_params)  # embeddings, heads, depformer
    n_forward = shape.frozen + shape.lora + n_ttt
    n_backward = sum(shape.layer_params[first:]) + n_ttt + outside  # re-gathered for recompute + backward
    return n_forward + n_backward


def traffic(shape: ModelShape, ttt: TTTShape | None, strategy: Strategy, model_bytes: int, first: int,
            world: int) -> Traffic:
    """What one GPU moves per micro-batch and step: ZeRO-3 gathers parameters (``gathered_parameters``)
    and reduce-scatters gradients; ZeRO-2 reduce-scatters gradients and all-gathers the updated
    parameters and ZeRO-0/1 all-reduce (``2 Psi p`` either way), as DDP does with the trainable
    parameters' own bytes; offload adds PCIe traffic, shared by the GPUs of a node (``/ W``)."""
    psi = trainable_params(shape, ttt)
    p = parameter_bytes(strategy, model_bytes)
    if not strategy.deepspeed:
        if world > 1:  # DDP all-reduce
            return Traffic(gradients=2 * native_trainable_bytes(shape.lora, ttt.params if ttt else 0, model_bytes))
        return Traffic()
    gather = pcie_params = pcie_optimizer = 0.0
    if strategy.zero_stage >= 3:
        gather = gathered_parameters(shape, ttt, first) * p
        gradients = psi * p  # reduce-scatter
    else:  # ZeRO-2: reduce-scatter + all-gather of the updated parameters; ZeRO-0/1: all-reduce
        gradients = 2 * psi * p
    if strategy.offload_param:
        pcie_params = gathered_parameters(shape, ttt, first) * p / world
    if strategy.offload_optimizer:
        pcie_optimizer = psi * (4 + p) / world  # fp32 gradients down, updated parameters up
    return Traffic(gather, gradients, pcie_params, pcie_optimizer)


def link_bytes_per_step(flow: Traffic, accumulate: int, world: int) -> float:
    """Bytes one GPU sends over the collective link per optimizer step: the gathers of every
    accumulated micro-batch and one gradient exchange; a ring collective moves ``(W-1)/W`` of the
    data per GPU (nothing on one GPU)."""
    return (accumulate * flow.gather + flow.gradients) * (world - 1) / world


def pcie_bytes_per_step(flow: Traffic, accumulate: int) -> float:
    """Bytes one GPU moves over PCIe per optimizer step under offload: the parameters of every
    micro-batch and one optimizer exchange."""
    return accumulate * flow.pcie_params + flow.pcie_optimizer


def step_time(compute_s: float, link_bytes: float, pcie_bytes: float, hw: Hardware) -> tuple[float, str]:
    """(seconds, bound) of one optimizer step: the slowest of compute, the collective link and PCIe,
    communication taken as fully overlapped with compute (a lower bound)."""
    times = {"compute": compute_s, "link": link_bytes / (hw.link * 1e9), "PCIe": pcie_bytes / (hw.pcie_gbs * 1e9)}
    bound = max(times, key=times.get)
    return times[bound], bound
