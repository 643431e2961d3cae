"""How many key/value pairs the bare TTT memory can hold: associative recall with no outer training.

Why: a memory variant can only recall beyond the attention window what its fast weights kept.
This writes ``pairs`` random unit keys with random values into a fresh ``TTTMemory`` (one pair
every other frame, as the recall set states them, a constant "silence" key/value on the frames
between and for ``gap`` frames after), then reads every key and counts a hit when the read is
nearest (cosine) to the key's own target ``v - k`` among the pairs written. Rows compare the
inner LayerNorm of Sun et al. (``ttt.ttt_layer.inner_norm=true``) with none (the delta rule)
over inner learning rates and initial fast-weight scales. Printed table only.

    python bench/memory_capacity.py
    python bench/memory_capacity.py --pairs 4 8 16 --head-dim 64 --mini-batch 16
"""

from __future__ import annotations

import argparse
import itertools
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moshi_ttt.ttt.config import TTTConfig  # noqa: E402
from moshi_ttt.ttt.memory import TTTMemory  # noqa: E402


def recall(inner: str, inner_norm: bool, init_std: float, eta: float, pairs: int, gap: int, head_dim: int,
           mini_batch: int, samples: int, seed: int = 0) -> float:
    """Share of keys whose read is nearest to their own target (chance: 1 / pairs)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the memory's initial fast weights
    cfg = TTTConfig(num_heads=1, mini_batch_size=mini_batch, inner=inner, inner_norm=inner_norm,
                    init_std=init_std, eta_max=max(1.0, eta))
    mem = TTTMemory(cfg, head_dim, read_lag=0)
    B, d = samples, head_dim
    keys = F.normalize(torch.randn(B, 1, pairs, d, generator=g), dim=-1)
    values = 0.3 * torch.randn(B, 1, pairs, d, generator=g)
    still_k = F.normalize(torch.randn(1, 1, 1, d, generator=g), dim=-1)
    still_v = 0.3 * torch.randn(1, 1, 1, d, generator=g)
    written = 2 * pairs + gap
    T = -(-(written + pairs) // mini_batch) * mini_batch
    k, v = still_k.expand(B, 1, T, d).clone(), still_v.expand(B, 1, T, d).clone()
    k[:, :, 1:2 * pairs:2], v[:, :, 1:2 * pairs:2] = keys, values
    q = still_k.expand(B, 1, T, d).clone()
    q[:, :, written:written + pairs] = keys
    lr = torch.full((B, 1, T), eta)
    with torch.no_grad():
        out, _ = mem(q, k, v, lr)
    read = out[:, :, written:written + pairs] - keys  # f(q) - q: the memory's part of the read
    sims = torch.einsum("bhid,bhjd->bhij", F.normalize(read, dim=-1), F.normalize(values - keys, dim=-1))
    return (sims.argmax(-1) == torch.arange(pairs)).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--gap", type=int, default=128, help="frames between the last pair and the reads")
    p.add_argument("--head-dim", type=int, default=16, help="the memory proof's heads: dim 64 / 4 heads")
    p.add_argument("--mini-batch", type=int, default=4)
    p.add_argument("--etas", type=float, nargs="+", default=[0.03, 0.3, 1.0])
    p.add_argument("--init-stds", type=float, nargs="+", default=[0.02, 0.2])
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args()
    print(f"recall of the bare memory (head dim {args.head_dim}, mini-batch {args.mini_batch}, reads "
          f"{args.gap} frames after the last pair; chance 1/pairs)\n")
    cols = [f"{n} pairs" for n in args.pairs]
    print("| inner | inner_norm | init_std | eta | " + " | ".join(cols) + " |")
    print("| --- | --- | ---: | ---: |" + " ---: |" * len(cols))
    for inner, norm, std, eta in itertools.product(("linear",), (True, False), args.init_stds, args.etas):
        cells = [f"{recall(inner, norm, std, eta, n, args.gap, args.head_dim, args.mini_batch, args.samples):.3f}"
                 for n in args.pairs]
        print(f"| {inner} | {str(norm).lower()} | {std:g} | {eta:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
