"""Inside a trained ``kv_slots`` memory: what each head's slot hands on at the recalled frames.

Why: recall says whether a memory works, not where it falls short. For the memory proof's
trained ``cache_replacement_kv_slots`` this replays the held-out sets and, at the frames whose
text token is recalled, compares per layer and head the memory read (times the slot's scale),
the window-only attention and the layer's output with what the same frozen attention computes
with a window long enough to see the pair (the oracle's lookup; exact in the first layer, whose
input is the same in both). Printed per set: gate, slot share beta, cosines to that lookup and
norms. Needs a finished ``make memory-proof`` (its ``outputs/memory_proof``, one seed's run of it:
``seed_<s>/`` inside, or the directory itself as the proof wrote it before seeds); ``--tiny`` makes a toy
one of that row alone in a temporary directory first (seconds; for tests). A set that fails prints
its error and the exit status is 1.

    python bench/kv_slots_probe.py
    python bench/kv_slots_probe.py --out outputs/memory_proof --sets 4_in 4_4x --samples 32
    python bench/kv_slots_probe.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moshi_ttt import memory_proof  # noqa: E402
from moshi_ttt.eval.samples import batched, iter_samples, stack_codes  # noqa: E402
from moshi_ttt.memory_proof import _trained  # noqa: E402
from moshi_ttt.models.attention import local_attention  # noqa: E402
from moshi_ttt.models.variants.cache_replacement import KVSlotsAttention  # noqa: E402

ROW = "cache_replacement_kv_slots"
FIELDS = ("beta", "cos_read", "cos_window", "cos_out", "norm_read", "norm_lookup")
# --tiny: the memory proof of this row alone at toy size (its held-out sets 2_in and 2_2x)
TINY_PROOF = ["--window", "16", "--pairs", "2", "--delays", "2", "--train-delay", "2", "--base-steps", "1",
              "--base-extend-steps", "1", "--extend-batch-size", "2", "--variant-steps", "2", "--pretrain-samples", "4",
              "--train-samples", "4", "--test-samples", "2", "--batch-size", "2", "--base-batch-size", "2",
              "--jobs", "1", "--variants", ROW, "--min-base-recall", "0"]  # a 1-step base: the plumbing
TINY_SETS = ["2_in", "2_2x"]


def probe(module: KVSlotsAttention, x: torch.Tensor, long_window: int) -> dict[str, torch.Tensor]:
    """Per head [B, H, T]: the slot's share, and the read / window / output against the long-window lookup."""
    B = x.shape[0]
    inputs = module._memory_inputs(x)  # (q, k, v, learning rates, ...): all of them are the memory's
    q0, k0, v = inputs[:3]
    read, nq = module._lagged_read(*inputs)
    q, k = module.rope(q0, k0, torch.zeros(B, dtype=torch.long), time_before_heads=False)
    o_window, lse = local_attention(q, k, v, module.window, return_lse=True)
    lookup = local_attention(q, k, v, long_window)
    out = module._joint(o_window, lse, read, nq)
    value, beta = module.memory_slot(read, nq, lse)
    cos = lambda a: F.cosine_similarity(a, lookup, dim=-1)  # noqa: E731
    return {"beta": beta, "cos_read": cos(value), "cos_window": cos(o_window),
            "cos_out": cos(out), "norm_read": value.norm(dim=-1), "norm_lookup": lookup.norm(dim=-1)}


def seed_dir(out: Path, seed: int) -> Path:
    """Where the proof in ``out`` keeps seed ``seed``'s sets, rows and runs."""
    return out / f"seed_{seed}" if (out / f"seed_{seed}").is_dir() else out


def report(out: Path, sets: list[str], samples: int) -> int:
    """Prints the gates and, per held-out set, the per-head table of one seed's proof in ``out``; 1 when a set
    failed."""
    saved_path = out / "ttt" / f"{ROW}.json"
    if not saved_path.exists():
        raise SystemExit(f"{saved_path}: missing; run `make memory-proof` first (with the {ROW} row)")
    saved = json.loads(saved_path.read_text())
    proof = json.loads((out / "memory_proof.json").read_text())
    model_cfg = OmegaConf.to_container(OmegaConf.load(out / "runs" / ROW / "config.yaml").model, resolve=True)
    model = _trained(model_cfg, saved["ttt"], Path(saved["ckpt"]))
    torch.set_grad_enabled(False)
    modules = {n.split(".self_attn")[0].removeprefix("transformer."): m for n, m in model.named_modules()
               if isinstance(m, KVSlotsAttention)}
    inputs: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        m.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
        print(f"{name}: gate tanh(g) {torch.tanh(m.gate_alpha).numpy().round(3)}, "
              f"scale {m.slot_scale.numpy().round(2)}, bias {m.slot_bias.numpy().round(2)}")
    failed = 0
    for label in sets:
        try:
            print_set(model, modules, inputs, out, label, samples, proof["oracle_window"])
        except Exception as e:  # noqa: BLE001 - one failed set, reported here and in the exit status
            traceback.print_exc()
            print(f"\n== {label}: FAILED: {type(e).__name__}: {e}")
            failed += 1
    return 1 if failed else 0


def print_set(model, modules: dict, inputs: dict[str, torch.Tensor], out: Path, label: str, samples: int,
              long_window: int) -> None:
    """Replays ``pairs_test_<label>`` and prints per layer and head the probe's means at the recalled frames."""
    rows = {name: {f: [] for f in FIELDS} for name in modules}
    hits = []
    found = list(iter_samples(str(out / f"pairs_test_{label}"), samples))
    if not found:
        raise FileNotFoundError(f"{out / f'pairs_test_{label}'}: no samples")
    for batch in batched(found, 8):
        codes = stack_codes([s.codes for s in batch])
        logits = model(codes).text_logits
        got = {name: probe(m, inputs[name], long_window) for name, m in modules.items()}
        for i, s in enumerate(batch):
            frames = [int(f) for f in s.meta["recall_frames"]]
            hits.append((logits[i, 0, frames].argmax(-1) == codes[i, 0, frames]).float())
            for name in modules:
                for f in FIELDS:
                    rows[name][f].append(got[name][f][i][:, frames].T)  # [frames, H]
    print(f"\n== {label}: recall {float(torch.cat(hits).mean()):.3f} ({len(found)} samples); "
          "per head, mean over the recalled frames")
    print("| layer | " + " | ".join(FIELDS) + " |")
    print("| --- |" + " ---: |" * len(FIELDS))
    for name, r in rows.items():
        cells = [" ".join(f"{x:.2f}" for x in torch.cat(r[f]).mean(0).tolist()) for f in FIELDS]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/memory_proof", help="a finished memory proof's --out")
    p.add_argument("--sets", nargs="+", default=["4_in", "4_4x", "8_in", "8_4x"],
                   help="held-out sets (pairs_test_<pairs>_<delay>)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the proof's seed to probe")
    p.add_argument("--tiny", action="store_true",
                   help=f"probe a toy memory proof of the {ROW} row made in a temporary directory: seconds; for tests")
    args = p.parse_args(argv)
    if not args.tiny:
        return report(seed_dir(Path(args.out), args.seed), args.sets, args.samples)
    torch.set_num_threads(1)  # toy sizes: on a shared machine a second OMP thread mostly spin-waits for a core
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # the proof's own table is not the probe's
            made = memory_proof.main(["--out", tmp, *TINY_PROOF])
        if made != 0:
            raise SystemExit("the toy memory proof failed")
        return report(seed_dir(Path(tmp), 0), TINY_SETS, 2)


if __name__ == "__main__":
    sys.exit(main())
