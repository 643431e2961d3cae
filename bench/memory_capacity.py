"""How many key/value pairs the bare TTT memory can hold: associative recall with no outer training.

Why: a memory variant can only recall beyond the attention window what its fast weights kept.
This writes ``pairs`` random unit keys with random values into a fresh ``TTTMemory`` (one pair
every other frame, as the recall set states them, a constant "silence" key/value on the frames
between and for ``gap`` frames after), then reads every key and counts a hit when the read is
nearest (cosine) to the key's own target ``v - k`` among the pairs written. Rows compare, in Sun
et al.'s mini-batch rule (``ttt.ttt_layer.rule=minibatch_gd``), its inner LayerNorm
(``inner_norm=true``) with none (the delta rule, one step per mini-batch) over inner learning
rates and initial fast-weight scales. Printed table only; a row that fails
prints its error and the exit status is 1.

    python bench/memory_capacity.py
    python bench/memory_capacity.py --tiny   # both inner norms, 2 pairs, 8 samples: seconds (tests)
    python bench/memory_capacity.py --pairs 4 8 16 --head-dim 64 --mini-batch 16
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

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
    cfg = TTTConfig(rule="minibatch_gd", num_heads=1, mini_batch_size=mini_batch, inner=inner, inner_norm=inner_norm,
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


def main(argv: list[str] | None = None) -> int:
    """Prints the table; returns 1 when a row failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="2 pairs, gap 4, one eta and init_std, 8 samples, one thread: seconds; for tests")
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8])
    p.add_argument("--gap", type=int, default=128, help="frames between the last pair and the reads")
    p.add_argument("--head-dim", type=int, default=16, help="the memory proof's heads: dim 64 / 4 heads")
    p.add_argument("--mini-batch", type=int, default=4)
    p.add_argument("--etas", type=float, nargs="+", default=[0.03, 0.3, 1.0])
    p.add_argument("--init-stds", type=float, nargs="+", default=[0.02, 0.2])
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args(argv)
    if args.tiny:
        args.pairs, args.gap, args.etas, args.init_stds, args.samples = [2], 4, [0.3], [0.02], 8
        torch.set_num_threads(1)  # on a shared machine a second OMP thread mostly spin-waits for a core
    print(f"recall of the bare memory (head dim {args.head_dim}, mini-batch {args.mini_batch}, reads "
          f"{args.gap} frames after the last pair; chance 1/pairs)\n")
    cols = [f"{n} pairs" for n in args.pairs]
    print("| inner | inner_norm | init_std | eta | " + " | ".join(cols) + " |")
    print("| --- | --- | ---: | ---: |" + " ---: |" * len(cols))
    failed = 0
    for inner, norm, std, eta in itertools.product(("linear",), (True, False), args.init_stds, args.etas):
        try:
            cells = [f"{recall(inner, norm, std, eta, n, args.gap, args.head_dim, args.mini_batch, args.samples):.3f}"
                     for n in args.pairs]
        except Exception as e:  # noqa: BLE001 - one failed row, reported in the table and the exit status
            traceback.print_exc()
            cells, failed = [f"FAILED: {type(e).__name__}: {e}".replace("\n", " ")], failed + 1
        print(f"| {inner} | {str(norm).lower()} | {std:g} | {eta:g} | " + " | ".join(cells) + " |", flush=True)
    if failed:
        print(f"{failed} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
