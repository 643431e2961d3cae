"""Inside a trained ``kv_slots`` memory: what each head's slot hands on at the recalled frames.

Why: recall says whether a memory works, not where it falls short. For the memory proof's
trained ``cache_replacement_kv_slots`` this replays the held-out sets and, at the frames whose
text token is recalled, compares per layer and head the memory read (times the slot's scale),
the window-only attention and the layer's output with what the same frozen attention computes
with a window long enough to see the pair (the oracle's lookup; exact in the first layer, whose
input is the same in both). Printed per set: gate, slot share beta, cosines to that lookup and
norms. Needs a finished ``make memory-proof`` (its ``outputs/memory_proof``).

    python bench/kv_slots_probe.py
    python bench/kv_slots_probe.py --out outputs/memory_proof --sets 4_in 4_4x --samples 32
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moshi_ttt.eval.samples import batched, iter_samples, stack_codes  # noqa: E402
from moshi_ttt.memory_proof import _trained  # noqa: E402
from moshi_ttt.models.attention import local_attention  # noqa: E402
from moshi_ttt.models.variants.cache_replacement import CacheReplacementAttention  # noqa: E402

ROW = "cache_replacement_kv_slots"
FIELDS = ("beta", "cos_read", "cos_window", "cos_out", "norm_read", "norm_lookup")


def probe(module: CacheReplacementAttention, x: torch.Tensor, long_window: int) -> dict[str, torch.Tensor]:
    """Per head [B, H, T]: the slot's share, and the read / window / output against the long-window lookup."""
    B = x.shape[0]
    q0, k0, v, lr = module._memory_inputs(x)
    read, nq = module._lagged_read(q0, k0, v, lr)
    q, k = module.rope(q0, k0, torch.zeros(B, dtype=torch.long), time_before_heads=False)
    o_window, lse = local_attention(q, k, v, module.window, return_lse=True)
    lookup = local_attention(q, k, v, long_window)
    out = module._joint(o_window, lse, read, nq)
    value, beta = module.memory_slot(read, nq, lse)
    cos = lambda a: F.cosine_similarity(a, lookup, dim=-1)  # noqa: E731
    return {"beta": beta, "cos_read": cos(value), "cos_window": cos(o_window),
            "cos_out": cos(out), "norm_read": value.norm(dim=-1), "norm_lookup": lookup.norm(dim=-1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/memory_proof", help="a finished memory proof's --out")
    p.add_argument("--sets", nargs="+", default=["4_in", "4_4x", "8_in", "8_4x"],
                   help="held-out sets (pairs_test_<pairs>_<delay>)")
    p.add_argument("--samples", type=int, default=64)
    args = p.parse_args()
    out = Path(args.out)
    saved_path = out / "ttt" / f"{ROW}.json"
    if not saved_path.exists():
        raise SystemExit(f"{saved_path}: missing; run `make memory-proof` first (with the {ROW} row)")
    saved = json.loads(saved_path.read_text())
    proof = json.loads((out / "memory_proof.json").read_text())
    model_cfg = OmegaConf.to_container(OmegaConf.load(out / "runs" / ROW / "config.yaml").model, resolve=True)
    model = _trained(model_cfg, saved["ttt"], Path(saved["ckpt"]))
    torch.set_grad_enabled(False)
    modules = {n.split(".self_attn")[0].removeprefix("transformer."): m for n, m in model.named_modules()
               if isinstance(m, CacheReplacementAttention)}
    inputs: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        m.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
        print(f"{name}: gate tanh(g) {torch.tanh(m.gate_alpha).numpy().round(3)}, "
              f"scale {m.slot_scale.numpy().round(2)}, bias {m.slot_bias.numpy().round(2)}")
    for label in args.sets:
        rows = {name: {f: [] for f in FIELDS} for name in modules}
        hits = []
        samples = list(iter_samples(str(out / f"pairs_test_{label}"), args.samples))
        for batch in batched(samples, 8):
            codes = stack_codes([s.codes for s in batch])
            logits = model(codes).text_logits
            got = {name: probe(m, inputs[name], proof["oracle_window"]) for name, m in modules.items()}
            for i, s in enumerate(batch):
                frames = [int(f) for f in s.meta["recall_frames"]]
                hits.append((logits[i, 0, frames].argmax(-1) == codes[i, 0, frames]).float())
                for name in modules:
                    for f in FIELDS:
                        rows[name][f].append(got[name][f][i][:, frames].T)  # [frames, H]
        print(f"\n== {label}: recall {float(torch.cat(hits).mean()):.3f} ({len(samples)} samples); "
              "per head, mean over the recalled frames")
        print("| layer | " + " | ".join(FIELDS) + " |")
        print("| --- |" + " ---: |" * len(FIELDS))
        for name, r in rows.items():
            cells = [" ".join(f"{x:.2f}" for x in torch.cat(r[f]).mean(0).tolist()) for f in FIELDS]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
