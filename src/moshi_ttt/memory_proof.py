"""``make memory-proof``: does TTT remember what the attention window forgot? (CPU, minutes)

1. Write a token-level long-range recall set whose fact-to-recall delay is longer than the
   attention window (train and held-out splits, different seeds).
2. Pretrain a tiny base Moshi (every weight trains) on the embedded demo data plus the recall
   set, with a short attention window, and save it as a checkpoint directory.
3. Freeze it and train each variant's TTT layers on the recall set with a two-stage curriculum.
4. Score every model on the held-out set: recall accuracy on the recalled tokens, and the
   loss late in the sequence; print the table and write it as markdown + JSON.

The design predicts that the frozen base and ``post_attention`` cannot recall beyond the
window while ``pre_attention``, ``cache_replacement`` and ``hybrid`` can; the table says what
actually happened.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moshi_ttt.data.recall import TokenRecallSpec, write_token_recall_shards

logger = logging.getLogger("moshi_ttt.memory_proof")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
VARIANTS = ("post_attention", "pre_attention", "cache_replacement", "hybrid")


def recall_samples(shards, max_samples: int | None = None):
    """(codes int64 [17, T], meta) of a recall set, in shard order."""
    import json

    import numpy as np

    from moshi_ttt.data.shards import decode_codes, iter_shard_samples, resolve_shards

    def fail(exn: Exception) -> bool:
        raise exn

    n = 0
    for url in resolve_shards(shards):
        for raw in iter_shard_samples(url, fail):
            yield torch.from_numpy(decode_codes(raw["codes.npy"]).astype(np.int64)), json.loads(raw["meta.json"])
            n += 1
            if max_samples is not None and n >= max_samples:
                return


def _batches(shards, max_samples, batch_size):
    batch: list = []
    for item in recall_samples(shards, max_samples):
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stack(batch) -> torch.Tensor:
    T = max(c.shape[1] for c, _ in batch)
    codes = torch.full((len(batch), 17, T), -1, dtype=torch.long)
    for i, (c, _) in enumerate(batch):
        codes[i, :, : c.shape[1]] = c
    return codes


@torch.no_grad()
def recall_accuracy(model, shards, max_samples: int | None = None, batch_size: int = 4) -> dict:
    """Teacher-forced: the share of the recalled tokens (text + Moshi's 8 codebooks over each
    sample's ``recall_span``) whose argmax prediction is the fact's token, overall and by delay."""
    model.eval()
    hits: dict[int, list[int]] = {}
    for batch in _batches(shards, max_samples, batch_size):
        codes = _stack(batch)
        out = model(codes)
        for i, (_, meta) in enumerate(batch):
            a, b = meta["recall_span"]
            text_ok = out.text_mask[i, 0, a:b] & (codes[i, 0, a:b] >= 0)
            text_hit = (out.text_logits[i, 0, a:b].argmax(-1) == codes[i, 0, a:b]) & text_ok
            audio_ok = out.mask[i, :, a:b] & (codes[i, 1:9, a:b] >= 0)
            audio_hit = (out.logits[i, :, a:b].argmax(-1) == codes[i, 1:9, a:b]) & audio_ok
            h = hits.setdefault(int(meta["delay_frames"]), [0, 0])
            h[0] += int(text_hit.sum() + audio_hit.sum())
            h[1] += int(text_ok.sum() + audio_ok.sum())
    total = [sum(h[0] for h in hits.values()), sum(h[1] for h in hits.values())]
    chance = (1 / model.text_card + 8 / model.card) / 9
    return {"overall": total[0] / max(total[1], 1), "by_delay": {d: h[0] / max(h[1], 1) for d, h in sorted(hits.items())},
            "num_samples": sum(1 for _ in recall_samples(shards, max_samples)), "chance": chance}


@torch.no_grad()
def late_loss(model, shards, start_frame: int, max_samples: int | None = None, batch_size: int = 4) -> float:
    """Mean unweighted cross-entropy per valid token (text + audio) over frames >= start_frame."""
    from moshi_ttt.training.loss import LossConfig, moshi_loss

    model.eval()
    num = den = 0.0
    for batch in _batches(shards, max_samples, batch_size):
        codes = _stack(batch)
        res = moshi_loss(model(codes), codes, LossConfig(), (model.text_padding_token_id, model.end_of_text_padding_id))
        num += float(res.token_losses[:, start_frame:].sum())
        den += float(res.token_counts[:, start_frame:].sum())
    return num / max(den, 1.0)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def _model_overrides(args) -> list[str]:
    return [
        "model=tiny", f"model.lm_kwargs.context={args.window}", f"model.lm_kwargs.dim={args.dim}",
        f"model.lm_kwargs.num_layers={args.layers}", "model.lm_kwargs.text_card=320",
    ]


def _recall_spec(args) -> TokenRecallSpec:
    return TokenRecallSpec(delay_frames=args.delay, card=64, text_card=64, fact_frames=args.fact_frames)


def _stage(name: str, frames: int, steps: int, args) -> str:
    """A curriculum stage as a Hydra override value."""
    return (f"{{name:{name},seconds:{frames / 12.5},steps:{steps},batch_size:{args.batch_size},"
            f"lr:{args.ttt_lr},warmup_steps:{min(10, steps // 4)}}}")


def run(args) -> dict:
    from moshi_ttt.export import export
    from moshi_ttt.models import build_model, load_exported, save_base_checkpoint
    from moshi_ttt.training import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spec = _recall_spec(args)
    train_set, test_set = out / "recall_train", out / "recall_test"
    write_token_recall_shards(train_set, args.train_samples, spec, seed=1, samples_per_shard=64)
    write_token_recall_shards(test_set, args.test_samples, spec, seed=2, samples_per_shard=64)
    max_frames = spec.fact_start + spec.fact_start_jitter + 2 * spec.cue_frames + 2 * spec.fact_frames \
        + spec.delay_frames + spec.tail_frames
    seq_len = max_frames
    common = [f"paths.output_root={out}", "logger=csv", "data=shards", "data.num_workers=0",
              "data.random_crop=false", "data.val_shards=null", "data.resampled=true", "ckpt_path=null",
              "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.progress.every_n_steps=50"]

    # 2. the base: everything trains, short window, demo speech + recall conversations whose
    # delays fit inside the window (it learns to copy from its context; beyond it, it cannot).
    base_sources = []
    for d in args.pretrain_delays:
        path = out / f"recall_pretrain_d{d}"
        write_token_recall_shards(path, args.train_samples, TokenRecallSpec(
            delay_frames=d, card=64, text_card=64, fact_frames=args.fact_frames), seed=100 + d, samples_per_shard=64)
        base_sources.append(str(path))
    in_window = out / "recall_test_in_window"
    write_token_recall_shards(in_window, args.test_samples, TokenRecallSpec(
        delay_frames=args.pretrain_delays[-1], card=64, text_card=64, fact_frames=args.fact_frames), seed=3)
    demo = Path(args.demo_data) / "shards" / "train"
    if demo.exists():
        base_sources.insert(0, str(demo))
    else:
        logger.warning("demo data not found at %s (run `make demo-data`); pretraining on the recall set only", demo)
    base_cfg = _compose([*_model_overrides(args), *common, "ttt=none", "curriculum=none", "run_name=base",
                         "+model.train_base=true", f"data.train_shards=[{','.join(base_sources)}]",
                         f"data.seq_len={seq_len}", f"data.batch_size={args.batch_size}",
                         f"trainer.max_steps={args.base_steps}", f"optim.lr={args.base_lr}", "optim.warmup_steps=20"])
    base_ckpt = out / "runs" / "base" / "checkpoints" / "last.ckpt"
    if not (args.reuse and base_ckpt.exists()):
        train(base_cfg)
    model_cfg = OmegaConf.to_container(base_cfg.model, resolve=True)
    base_model = build_model(model_cfg, {"variant": "none"})
    state = torch.load(base_ckpt, weights_only=False)["state_dict"]
    base_model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    base_dir = save_base_checkpoint(base_model, model_cfg["lm_kwargs"], out / "base_checkpoint")

    # 3. each variant's TTT on the frozen base, with a short -> full curriculum.
    models = {"frozen base": build_model({**model_cfg, "source": "dir", "path": str(base_dir), "train_base": False},
                                         {"variant": "none"})}
    stage_short = max(16, seq_len // 2)
    for variant in args.variants:
        if args.reuse and (out / "export" / variant / "config.json").exists():
            models[variant] = load_exported(out / "export" / variant)
            continue
        cfg = _compose([
            *_model_overrides(args), *common, f"ttt={variant}", "curriculum=demo", f"run_name={variant}",
            "model.source=dir", f"model.path={base_dir}", f"data.train_shards={train_set}",
            "ttt.layers=null", f"ttt.default_num_layers={args.layers}", f"ttt.window={args.window}",
            f"ttt.layer.mini_batch_size={args.mini_batch}", f"ttt.layer.num_heads={args.ttt_heads}",
            f"curriculum.stages=[{_stage('short', stage_short, args.variant_steps // 3, args)},"
            f"{_stage('full', seq_len, args.variant_steps - args.variant_steps // 3, args)}]",
            f"optim.lr={args.ttt_lr}",
        ])
        summary = train(cfg)
        export(Path(summary["checkpoint_dir"]) / "last.ckpt", out / "export" / variant)
        models[variant] = load_exported(out / "export" / variant)

    # 4. score on the held-out recall set.
    rows = []
    acc = recall_accuracy(models["frozen base"], str(in_window), max_samples=args.test_samples)
    rows.append({"model": f"frozen base, delay {args.pretrain_delays[-1]} (inside the window)",
                 "recall_accuracy": acc["overall"], "chance": acc["chance"], "late_loss": float("nan")})
    late_start = spec.fact_start + spec.fact_start_jitter + spec.cue_frames + spec.fact_frames + args.window
    for name, model in models.items():
        acc = recall_accuracy(model, str(test_set), max_samples=args.test_samples)
        rows.append({"model": name, "recall_accuracy": acc["overall"], "chance": acc["chance"],
                     "late_loss": late_loss(model, str(test_set), start_frame=late_start,
                                            max_samples=args.test_samples)})
    result = {"window_frames": args.window, "delay_frames": args.delay, "late_start_frame": late_start,
              "seconds": time.perf_counter() - t0, "rows": rows}
    (out / "memory_proof.json").write_text(json.dumps(result, indent=2))
    (out / "memory_proof.md").write_text(format_table(result))
    print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    lines = [f"memory proof: attention window {result['window_frames']} frames, fact recalled "
             f"{result['delay_frames']} frames later ({result['seconds']:.0f} s on this machine)", "",
             "| model | recall accuracy | chance | loss after frame " + f"{result['late_start_frame']} |",
             "| --- | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['recall_accuracy']:.3f} | {r['chance']:.3f} | {r['late_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/memory_proof")
    p.add_argument("--demo-data", default="data/generated/demo")
    p.add_argument("--window", type=int, default=32, help="attention window of the base (frames)")
    p.add_argument("--delay", type=int, default=64, help="frames from the fact to its recall (> window)")
    p.add_argument("--fact-frames", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ttt-heads", type=int, default=4)
    p.add_argument("--mini-batch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--test-samples", type=int, default=64)
    p.add_argument("--base-steps", type=int, default=800)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--variant-steps", type=int, default=240)
    p.add_argument("--ttt-lr", type=float, default=3e-3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--pretrain-delays", type=int, nargs="+", default=[4, 12, 20],
                   help="fact-to-recall delays (inside the window) of the base's pretraining data")
    p.add_argument("--reuse", action="store_true", help="keep the base and variants already trained in --out")
    args = p.parse_args(argv)
    if max(args.pretrain_delays) >= args.window:
        p.error("--pretrain-delays must stay inside --window")
    if args.delay <= args.window:
        p.error(f"--delay {args.delay} must exceed --window {args.window}: the point is recall beyond the window")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
