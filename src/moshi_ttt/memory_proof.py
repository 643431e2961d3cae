"""``make memory-proof``: does TTT remember what the attention window forgot? (CPU, minutes)

1. Write token-level long-range recall sets (``moshi_ttt.data.recall``): after a fixed cue comes a
   random one-word fact; the same cue comes back later and the word must follow it again (the
   recall block's audio is fresh noise, so the word is what is scored). All splits share the cue.
   Held-out sets: the fact recalled inside the attention window and beyond it.
2. Pretrain a tiny base Moshi (every weight trains) on the embedded demo data plus short recall
   conversations whose delays fit inside the window, with a short attention window: it learns to
   copy from its context. Save it as a checkpoint directory.
3. Freeze it and train each variant's TTT layers on the beyond-window recall set with a
   two-stage curriculum.
4. Score every model on the held-out sets (``moshi_ttt.eval.recall``): recall accuracy inside and
   beyond the window, and the loss late in the sequence; print the table, write markdown + JSON.

The design predicts that the frozen base and ``post_attention`` cannot recall beyond the
window while ``pre_attention``, ``cache_replacement`` and ``hybrid`` can; the table says what
actually happened (the in-window column shows whether the base can copy at all).
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
from moshi_ttt.eval.recall import late_loss, recall_report

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


def _spec(args, delay: int, jitter: int | None = None, margin: int | None = None) -> TokenRecallSpec:
    """The recall layout: ``margin`` filler frames before the fact cue and after the recall."""
    margin = args.margin if margin is None else margin
    return TokenRecallSpec(delay_frames=delay, fact_frames=args.fact_frames, cue_frames=args.cue_frames,
                           fact_start=margin, fact_start_jitter=args.jitter if jitter is None else jitter,
                           tail_frames=margin, card=64, text_card=64, same_cue=args.same_cue,
                           fact_streams=args.fact_streams)


def _frames(spec: TokenRecallSpec) -> int:
    """The longest conversation of a set with this layout."""
    return (spec.fact_start + spec.fact_start_jitter + spec.cue_frames + 2 * spec.fact_frames
            + spec.delay_frames + spec.tail_frames)


def _stage(name: str, frames: int, steps: int, args) -> str:
    """A curriculum stage as a Hydra override value."""
    return (f"{{name:{name},seconds:{frames / 12.5},steps:{steps},batch_size:{args.batch_size},"
            f"lr:{args.ttt_lr},warmup_steps:{min(10, steps // 4)}}}")


def _score(model, shards: str, args, late_start: int | None) -> dict:
    """The recall of the fact's scored tokens (its words when ``fact_streams == "text"``: the recall
    block's audio is then fresh noise), text + audio accuracy apart, and the late loss."""
    rep = recall_report(model, shards, max_samples=args.test_samples)
    return {"recall": rep["text_accuracy"] if args.fact_streams == "text" else rep["overall"],
            "text": rep["text_accuracy"], "audio": rep["audio_accuracy"],
            "late_loss": float("nan") if late_start is None else late_loss(
                model, shards, start_frame=late_start, max_samples=args.test_samples)}


def _chance(spec: TokenRecallSpec) -> float:
    """Accuracy of a guess among the set's possible fact tokens (words: ids above the paddings)."""
    words = 1 / (spec.text_card - max(spec.text_padding_id, spec.end_padding_id) - 1)
    if spec.fact_streams == "text":
        return words
    per_frame = spec.fact_frames // 2 + (spec.fact_frames % 2)  # a word every other frame
    return (per_frame * words + 8 * spec.fact_frames / spec.card) / (per_frame + 8 * spec.fact_frames)


def run(args) -> dict:
    from moshi_ttt.export import export
    from moshi_ttt.models import build_model, load_exported, save_base_checkpoint
    from moshi_ttt.training import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    spec = _spec(args, args.delay)
    in_spec = _spec(args, args.pretrain_delays[-1])
    train_set, test_set, in_window = out / "recall_train", out / "recall_test", out / "recall_test_in_window"
    write_token_recall_shards(train_set, args.train_samples, spec, seed=1, samples_per_shard=64, cue_seed=0)
    write_token_recall_shards(test_set, args.test_samples, spec, seed=2, samples_per_shard=64, cue_seed=0)
    write_token_recall_shards(in_window, args.test_samples, in_spec, seed=3, samples_per_shard=64, cue_seed=0)
    seq_len = _frames(spec)
    common = [f"paths.output_root={out}", "logger=csv", "data=shards", "data.num_workers=0",
              "data.random_crop=false", "data.val_shards=null", "data.resampled=true", "ckpt_path=null",
              "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.progress.every_n_steps=50",
              f"loss.first_codebook_weight={args.first_codebook_weight}"]

    # 2. the base: everything trains, short window, demo speech + short recall conversations whose
    # delays fit inside the window (it learns to copy from its context; beyond it, it cannot).
    base_sources = []
    pre_specs = [_spec(args, d, jitter=args.pretrain_jitter, margin=args.pretrain_margin)
                 for d in args.pretrain_delays]
    for d, pre in zip(args.pretrain_delays, pre_specs, strict=True):
        path = out / f"recall_pretrain_d{d}"
        write_token_recall_shards(path, args.pretrain_samples, pre, seed=100 + d, samples_per_shard=32,
                                  cue_seed=0)
        base_sources.append(str(path))
    demo = Path(args.demo_data) / "shards" / "train"
    if demo.exists():
        base_sources.insert(0, str(demo))
    else:
        logger.warning("demo data not found at %s (run `make demo-data`); pretraining on the recall set only", demo)
    base_cfg = _compose([*_model_overrides(args), *common, "ttt=none", "curriculum=none", "run_name=base",
                         "+model.train_base=true", "data.min_frames=1", f"data.train_shards=[{','.join(base_sources)}]",
                         f"data.seq_len={max(_frames(p) for p in pre_specs)}", f"data.batch_size={args.base_batch_size}",
                         f"trainer.max_steps={args.base_steps}", f"optim.lr={args.base_lr}",
                         f"optim.warmup_steps={min(50, args.base_steps // 10)}"])
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

    # 3. each variant's TTT on the frozen base, with a short -> full curriculum.
    models = {"frozen base": build_model({**model_cfg, "source": "dir", "path": str(base_dir), "train_base": False},
                                         {"variant": "none"})}
    stage_short = max(16, seq_len // 2)
    for variant in args.variants:
        t = time.perf_counter()
        if not (args.reuse and (out / "export" / variant / "config.json").exists()):
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
        timings[variant] = time.perf_counter() - t

    # 4. score on the held-out recall sets: inside the window (the delay the base was taught) and
    # beyond it; the late loss covers the frames after the fact has left the window.
    late_start = spec.fact_start + spec.fact_start_jitter + spec.cue_frames + spec.fact_frames + args.window
    rows = []
    for name, model in models.items():
        inside = _score(model, str(in_window), args, None)
        beyond = _score(model, str(test_set), args, late_start)
        rows.append({"model": name, "recall_in_window": inside["recall"], "recall_accuracy": beyond["recall"],
                     "text_accuracy": beyond["text"], "audio_accuracy": beyond["audio"],
                     "chance": _chance(spec), "late_loss": beyond["late_loss"]})
        logger.info("scored %s: %s", name, rows[-1])
    result = {"window_frames": args.window, "delay_frames": args.delay, "fact_streams": args.fact_streams,
              "in_window_delay_frames": args.pretrain_delays[-1], "late_start_frame": late_start,
              "seconds": time.perf_counter() - t0, "timings": timings, "settings": vars(args), "rows": rows}
    (out / "memory_proof.json").write_text(json.dumps(result, indent=2))
    (out / "memory_proof.md").write_text(format_table(result))
    print(format_table(result), flush=True)
    return result


def format_table(result: dict) -> str:
    scored = "its words (text)" if result.get("fact_streams") == "text" else "text + Moshi's 8 codebooks"
    lines = [f"memory proof: attention window {result['window_frames']} frames; a fact recalled "
             f"{result['in_window_delay_frames']} frames later (inside the window) or "
             f"{result['delay_frames']} frames later (beyond it), scored on {scored}; "
             f"{result['seconds']:.0f} s on this machine", "",
             f"| model | recall, delay {result['in_window_delay_frames']} | recall, delay {result['delay_frames']} "
             f"| chance | audio acc. | loss after frame {result['late_start_frame']} |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['recall_in_window']:.3f} | {r['recall_accuracy']:.3f} | "
                     f"{r['chance']:.3f} | {r['audio_accuracy']:.3f} | {r['late_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/memory_proof")
    p.add_argument("--demo-data", default="data/generated/demo")
    p.add_argument("--window", type=int, default=32, help="attention window of the base (frames)")
    p.add_argument("--delay", type=int, default=64, help="frames from the fact to its recall (> window)")
    p.add_argument("--fact-frames", type=int, default=2, help="2: one word (a word every other frame)")
    p.add_argument("--fact-streams", choices=("text", "all"), default="text",
                   help="text: the fact is its words, the recall block's audio is noise; all: text + 16 codebooks")
    p.add_argument("--cue-frames", type=int, default=4)
    p.add_argument("--margin", type=int, default=8, help="filler frames before the fact cue and after the recall")
    p.add_argument("--jitter", type=int, default=16, help="random extra filler before the fact cue")
    p.add_argument("--pretrain-margin", type=int, default=8)
    p.add_argument("--pretrain-jitter", type=int, default=24,
                   help="long enough that pretraining sequences fill the attention window")
    p.add_argument("--distinct-cues", dest="same_cue", action="store_false",
                   help="a recall cue different from the fact cue (default: the same cue, content-addressable)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ttt-heads", type=int, default=4)
    p.add_argument("--mini-batch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="of the variants' training")
    p.add_argument("--base-batch-size", type=int, default=32, help="of the base's pretraining (short sequences)")
    p.add_argument("--first-codebook-weight", type=float, default=1.0,
                   help="loss weight of the semantic codebook (Moshi: 100); 1 weighs every scored token alike")
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--pretrain-samples", type=int, default=512, help="per pretraining delay")
    p.add_argument("--test-samples", type=int, default=128)
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--variant-steps", type=int, default=480)
    p.add_argument("--ttt-lr", type=float, default=3e-3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                   help="none: only the base")
    p.add_argument("--pretrain-delays", type=int, nargs="+", default=[4, 12, 20],
                   help="fact-to-recall delays (inside the window) of the base's pretraining data")
    p.add_argument("--reuse", action="store_true", help="keep the base and variants already trained in --out")
    args = p.parse_args(argv)
    if max(args.pretrain_delays) + args.fact_frames > args.window:
        p.error("--pretrain-delays + --fact-frames must stay inside --window")
    if args.delay <= args.window:
        p.error(f"--delay {args.delay} must exceed --window {args.window}: the point is recall beyond the window")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
