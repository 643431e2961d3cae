"""``make memory-proof``: does TTT remember what the attention window forgot? (CPU, minutes)

The task is multi-query associative recall in Moshi's text stream (``moshi_ttt.data.recall``,
``PairsRecallSpec``): a conversation states a few key/value word pairs, falls silent for a gap,
then asks every key again, each followed by its value. Predicting a value means finding where
its key was stated and copying the word after it. Inside the attention window a transformer
learns this lookup; beyond it, attention cannot see the pairs and only a memory can help.

1. Pretrain a tiny base Moshi (every weight trains) with a short attention window on
   conversations whose pairs stay inside the window (optionally mixed with the demo speech):
   it learns the lookup. Save it as a checkpoint directory and freeze it.
2. Train each variant's TTT layers on conversations whose gaps mostly put the pairs beyond the
   window (a quarter inside, so the base's own skill is kept), with a two-stage curriculum:
   the short in-window conversations first, then everything.
3. Score every model on held-out sets with the pairs inside and beyond the window
   (``moshi_ttt.eval.recall``: the share of query values predicted exactly, teacher-forced) and
   the loss after the pairs left the window; print the table, write markdown + JSON.

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

from moshi_ttt.constants import FRAME_RATE
from moshi_ttt.data.recall import PairsRecallSpec, write_pairs_recall_shards
from moshi_ttt.eval.recall import late_loss, recall_report

logger = logging.getLogger("moshi_ttt.memory_proof")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# name -> Hydra overrides of the variant
VARIANTS = {
    "post_attention": ["ttt=post_attention"],
    "pre_attention": ["ttt=pre_attention"],
    "cache_replacement": ["ttt=cache_replacement"],
    "cache_replacement_kv_slots": ["ttt=cache_replacement", "ttt.memory_read=kv_slots"],
    "hybrid": ["ttt=hybrid"],
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def _model_overrides(args) -> list[str]:
    return ["model=tiny", f"model.lm_kwargs.context={args.window}", f"model.lm_kwargs.dim={args.dim}",
            f"model.lm_kwargs.num_layers={args.layers}"]


def _stage(name: str, frames: int, steps: int, args) -> str:
    """A curriculum stage as a Hydra override value."""
    return (f"{{name:{name},seconds:{frames / FRAME_RATE},steps:{steps},batch_size:{args.batch_size},"
            f"lr:{args.ttt_lr},warmup_steps:{min(20, steps // 4)},min_lr_ratio:1.0}}")  # constant after warmup


def _score(model, shards: str, args, late_start: int | None) -> dict:
    rep = recall_report(model, shards, max_samples=args.test_samples)
    return {"recall": rep["text_accuracy"],
            "late_loss": float("nan") if late_start is None else late_loss(
                model, shards, start_frame=late_start, max_samples=args.test_samples)}


def run(args) -> dict:
    from moshi_ttt.export import export
    from moshi_ttt.models import build_model, load_exported, save_base_checkpoint
    from moshi_ttt.training import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    pairs = (args.pairs,)
    inside, beyond = args.inside_gap, args.gap
    pretrain = PairsRecallSpec(gaps=tuple(range(0, 2 * inside + 1)), pairs=tuple(range(2, 2 * args.pairs - 1)))
    variant_set = PairsRecallSpec(gaps=(inside, beyond, beyond, beyond), pairs=pairs)
    tests = {"in": PairsRecallSpec(gaps=(inside,), pairs=pairs), "beyond": PairsRecallSpec(gaps=(beyond,), pairs=pairs)}
    write_pairs_recall_shards(out / "pairs_pretrain", args.pretrain_samples, pretrain, seed=1)
    write_pairs_recall_shards(out / "pairs_train", args.train_samples, variant_set, seed=2)
    for i, (name, spec) in enumerate(tests.items()):
        write_pairs_recall_shards(out / f"pairs_test_{name}", args.test_samples, spec, seed=10 + i)
    common = [f"paths.output_root={out}", "logger=csv", "data=shards", "data.num_workers=0", "data.min_frames=1",
              "data.random_crop=false", "data.val_shards=null", "data.resampled=true", "ckpt_path=null",
              "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.progress.every_n_steps=250",
              "loss.first_codebook_weight=1.0"]

    # 1. the base: everything trains, short window, pairs inside the window (+ demo speech).
    sources = [str(out / "pairs_pretrain")]
    demo = Path(args.demo_data) / "shards" / "train"
    if args.demo_speech:
        if not demo.exists():
            raise FileNotFoundError(f"--demo-speech: no demo shards at {demo} (run `make demo-data`)")
        sources.append(str(demo))
    base_cfg = _compose([*_model_overrides(args), *common, "ttt=none", "curriculum=none", "run_name=base",
                         "+model.train_base=true", f"data.train_shards=[{','.join(sources)}]",
                         f"data.seq_len={pretrain.frames()}", f"data.batch_size={args.base_batch_size}",
                         f"trainer.max_steps={args.base_steps}", f"optim.lr={args.base_lr}",
                         f"optim.warmup_steps={min(100, args.base_steps // 10)}", "optim.weight_decay=0.0"])
    base_ckpt = out / "runs" / "base" / "checkpoints" / "last.ckpt"
    t = time.perf_counter()
    if not (args.reuse and base_ckpt.exists()):
        train(base_cfg)
    timings["base"] = time.perf_counter() - t
    model_cfg = OmegaConf.to_container(base_cfg.model, resolve=True)
    base_model = build_model(model_cfg, {"variant": "none"})
    state = torch.load(base_ckpt, weights_only=False)["state_dict"]
    base_model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    base_dir = save_base_checkpoint(base_model, model_cfg["lm_kwargs"], out / "base_checkpoint")

    # 2. each variant's TTT on the frozen base: in-window conversations first, then everything.
    models = {"frozen base": build_model({**model_cfg, "source": "dir", "path": str(base_dir), "train_base": False},
                                         {"variant": "none"})}
    short = tests["in"].frames()
    for variant in args.variants:
        t = time.perf_counter()
        if not (args.reuse and (out / "export" / variant / "config.json").exists()):
            warm = max(1, args.variant_steps // 10)
            cfg = _compose([
                *_model_overrides(args), *common, *VARIANTS[variant], "curriculum=demo", f"run_name={variant}",
                "model.source=dir", f"model.path={base_dir}", f"data.train_shards={out / 'pairs_train'}",
                "ttt.layers=null", f"ttt.default_num_layers={args.layers}", f"ttt.window={args.window}",
                f"ttt.layer.mini_batch_size={args.mini_batch}", f"ttt.layer.num_heads={args.ttt_heads}",
                f"curriculum.stages=[{_stage('in_window', short, warm, args)},"
                f"{_stage('full', variant_set.frames(), args.variant_steps - warm, args)}]",
                f"optim.lr={args.ttt_lr}", "optim.weight_decay=0.0",
            ])
            summary = train(cfg)
            export(Path(summary["checkpoint_dir"]) / "last.ckpt", out / "export" / variant)
        models[variant] = load_exported(out / "export" / variant)
        timings[variant] = time.perf_counter() - t

    # 3. score: pairs inside and beyond the window; late loss = the query block of the beyond set.
    late_start = 1 + 2 * args.pairs + beyond
    chance = 1 / len(tests["beyond"].value_ids)
    rows = []
    for name, model in models.items():
        a = _score(model, str(out / "pairs_test_in"), args, None)
        b = _score(model, str(out / "pairs_test_beyond"), args, late_start)
        rows.append({"model": name, "recall_in_window": a["recall"], "recall_accuracy": b["recall"],
                     "chance": chance, "late_loss": b["late_loss"]})
        logger.info("scored %s: %s", name, rows[-1])
    def distances(gap: int) -> list[int]:  # last stated value -> first query, first key -> last value
        return [gap + 1, gap + 4 * args.pairs - 1]

    result = {"window_frames": args.window, "pairs": args.pairs,
              "in_window_distance": distances(inside), "beyond_distance": distances(beyond),
              "late_start_frame": late_start, "seconds": time.perf_counter() - t0, "timings": timings,
              "settings": vars(args), "rows": rows}
    (out / "memory_proof.json").write_text(json.dumps(result, indent=2))
    (out / "memory_proof.md").write_text(format_table(result))
    print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    (a0, a1), (b0, b1) = result["in_window_distance"], result["beyond_distance"]
    lines = [f"memory proof: attention window {result['window_frames']} frames; {result['pairs']} key/value pairs "
             f"queried {a0}-{a1} frames after they were stated (inside the window) or {b0}-{b1} frames after "
             f"(beyond it); {result['seconds']:.0f} s on this machine", "",
             "| model | recall inside the window | recall beyond the window | chance | loss of the late queries |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['recall_in_window']:.3f} | {r['recall_accuracy']:.3f} | "
                     f"{r['chance']:.3f} | {r['late_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/memory_proof")
    p.add_argument("--demo-data", default="data/generated/demo")
    p.add_argument("--demo-speech", action="store_true", help="mix the demo speech shards into the base's pretraining")
    p.add_argument("--window", type=int, default=32, help="attention window of the base (frames)")
    p.add_argument("--pairs", type=int, default=4, help="key/value pairs per conversation")
    p.add_argument("--inside-gap", type=int, default=4, help="silent frames before the queries, inside the window")
    p.add_argument("--gap", type=int, default=40, help="silent frames before the queries, beyond the window")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ttt-heads", type=int, default=4)
    p.add_argument("--mini-batch", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16, help="of the variants' training")
    p.add_argument("--base-batch-size", type=int, default=32)
    p.add_argument("--pretrain-samples", type=int, default=4096)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--test-samples", type=int, default=128)
    p.add_argument("--base-steps", type=int, default=7000, help="the lookup emerges after ~5000 steps at dim 64")
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--variant-steps", type=int, default=1400)
    p.add_argument("--ttt-lr", type=float, default=3e-3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="none: only the base")
    p.add_argument("--reuse", action="store_true", help="keep the base and variants already trained in --out")
    args = p.parse_args(argv)
    if 2 * args.inside_gap + 8 * args.pairs - 9 >= args.window:  # the pretraining's longest lookup
        p.error(f"--inside-gap {args.inside_gap} with {args.pairs} pairs does not fit the --window {args.window}")
    if args.gap < args.window:
        p.error(f"--gap {args.gap} must be at least --window {args.window}: the point is recall beyond the window")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
