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

    # 2. the base: everything trains, short window, demo speech + the recall conversations.
    base_sources = [str(train_set)]
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
    from moshi_ttt.eval import late_loss, recall_accuracy

    rows = []
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
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--variant-steps", type=int, default=240)
    p.add_argument("--ttt-lr", type=float, default=3e-3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--reuse", action="store_true", help="keep the base and variants already trained in --out")
    args = p.parse_args(argv)
    if args.delay <= args.window:
        p.error(f"--delay {args.delay} must exceed --window {args.window}: the point is recall beyond the window")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
