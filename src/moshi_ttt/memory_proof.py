"""``make memory-proof``: does TTT remember far beyond the attention window? (CPU, minutes)

The task is multi-query associative recall in Moshi's text stream (``moshi_ttt.data.recall``,
``PairsRecallSpec`` with ``key_in_audio``): a conversation states key/value word pairs (each
value's frame also carries its key in the user's audio, so the lookup is one attention hop),
falls silent for a gap, then asks every key again, each followed by its value. Inside the
attention window the tiny base learns the lookup; beyond it only a memory can help.

1. Pretrain a tiny base Moshi (every weight trains) with a ``--window``-frame attention window on
   conversations whose pairs stay inside it (the lookup emerges there), then with a window that
   covers the delays up to ``--oracle-delay`` (8x) on pairs at every distance up to it
   (``--base-extend-steps``: a lookup learned on short distances does not reach 4-8x as far,
   and the oracle must); save it as a checkpoint directory with the ``--window`` window; freeze it.
2. Train each row's TTT layers on the frozen base (same window) on conversations whose pairs are
   queried ``--train-delay`` x the window later (a quarter inside, so the base's own skill is
   kept): a short in-window stage first, then everything. A row is the product's own
   configuration (``conf/memory_proof.yaml``: a ``conf/ttt`` option, plus sizes only), so the
   memory proven here is the memory a user trains; the ``recipe`` row is the 7B recipe's ``ttt``
   block and teacher with its scales read onto the toy's (``recipe_row``). The loss is the text words' (audio is a
   constant silence and padding follows from the layout: their gradients are only noise here;
   ``--full-loss`` for Moshi's whole loss).
3. Score on held-out sets with ``--pairs`` pairs queried inside the window and at each of
   ``--delays`` x the window (``moshi_ttt.eval.recall``: the share of query values predicted
   exactly, teacher-forced), and the loss of the late queries. Rows: the frozen base, an oracle
   (the same frozen weights with a window that covers the longest delay: what a perfect memory
   could reach) and every variant. Writes ``memory_proof.json``, ``memory_proof.md`` and
   ``recall_vs_delay.png``.

``--seeds 0 1 2`` repeats all of it per seed (its own shards, base and rows, under
``--out/seed_<s>``) and reports the mean and the min over seeds: a memory that opens on one seed
only is not a result. The design predicts that the frozen base and ``post_attention`` stay near
chance beyond the window while the others recall; the table says what actually happened.
``--reuse`` keeps the bases and rows already trained in ``--out`` (their training times,
measured when they were trained, stay in each seed's ``timings.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moshi_ttt.data.recall import PairsRecallSpec, write_pairs_recall_shards
from moshi_ttt.eval.recall import late_loss, recall_report

logger = logging.getLogger("moshi_ttt.memory_proof")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


PROOF_FILE = CONF_DIR / "memory_proof.yaml"
#: The keys a row may set: sizes, the one key that selects the alternative rule, and the product's teacher
#: (loss.distill: the frozen base with a longer window teaching the student's logits, a training objective,
#: not a memory setting; its window is a size, ``{o}``).
SIZE_KEYS = ("ttt.ttt_layer_attention_window", "ttt.layer_indices", "ttt.default_num_layers")
SELECT_KEYS = ("ttt.ttt_layer.rule",)
TEACHER_KEYS = ("loss.distill.weight", "loss.distill.teacher_window")
DEFAULT_LAYERS = 2  # --layers
VARIANTS_WALL = "variants together"  # timings.json: the wall time of training the variants side by side


def relative_layers(indices, from_layers: int, to_layers: int) -> list[int]:
    """Layer indices of a ``from_layers``-deep model at the same relative depth in a ``to_layers``-deep one
    (the last 3 of 32 -> the last of 2): each layer maps to the one whose share of the depth holds it."""
    return sorted({(int(i) % from_layers) * to_layers // from_layers for i in indices})


def _override_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def _flatten(mapping: dict, prefix: str) -> list[tuple[str, object]]:
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}.{key}")
        else:
            out.append((f"{prefix}.{key}", value))
    return out


def recipe_row(experiment: str, num_layers: int) -> list[str]:
    """The overrides that give a ``num_layers``-deep toy the ``ttt`` block and the teacher of
    ``conf/experiment/<experiment>``: its ``ttt`` option and every key its block sets, and its
    ``loss.distill``, with the 7B's three scales read onto the toy's:

    - ``layer_indices`` relative to the recipe model's depth ([0, 16, 31] of 32 -> [0, 1] of 2);
    - the TTT layers' own short window (hybrid, cache_replacement: ``ttt_layer_attention_window``, set or
      the schema's) -> the toy base's window ``{w}`` (``{wm}``): the distance beyond which attention is blind
      and the memory must carry the pair;
    - the teacher's window, null (the model's own context: Moshi's 3000 frames) -> the oracle's ``{o}``: the
      window that reaches every pair the proof asks for (526 frames by default, longer than the rows' 91-frame
      training sequences: the teacher sees each whole). The 7B's student sees 256 of the teacher's 3000 frames;
      the toy's 32 of 91."""
    import yaml

    from moshi_ttt.models.loading import lm_kwargs_for

    path = CONF_DIR / "experiment" / f"{experiment}.yaml"
    recipe = yaml.safe_load(path.read_text())
    defaults = [d for d in recipe.get("defaults", []) if isinstance(d, dict)]
    option = next((d["override /ttt"] for d in defaults if "override /ttt" in d), None)
    model = next((d["override /model"] for d in defaults if "override /model" in d), None)
    if option is None or model is None:
        raise ValueError(f"{path}: the recipe row needs its ttt and model options")
    lm = lm_kwargs_for(yaml.safe_load((CONF_DIR / "model" / f"{model}.yaml").read_text()))
    depth, context = int(lm["num_layers"]), int(lm["context"])
    short_window = "{wm}" if option.startswith("cache_replacement") else "{w}"
    row = [f"ttt={option}"]
    block = _flatten(recipe.get("ttt") or {}, "ttt")
    for key, value in block:
        if key == "ttt.layer_indices" and value is not None:
            value = relative_layers(value, depth, num_layers)
        elif key == "ttt.ttt_layer_attention_window":
            value = short_window
        row.append(f"{key}={_override_value(value)}")
    if (option == "hybrid" or option.startswith("cache_replacement")) and \
            "ttt.ttt_layer_attention_window" not in dict(block):
        row.append(f"ttt.ttt_layer_attention_window={short_window}")  # the schema's 256 frames on the 7B
    distill = ((recipe.get("loss") or {}).get("distill") or {})
    if distill.get("weight"):
        window = distill.get("teacher_window")
        if window not in (None, context):
            raise ValueError(f"{path}: loss.distill.teacher_window={window}: the recipe row maps only the model's "
                             f"own context (null, {context} frames) onto the toy's oracle window")
        row += [f"loss.distill.weight={_override_value(distill['weight'])}", "loss.distill.teacher_window={o}"]
    return row


def proof_rows(num_layers: int = DEFAULT_LAYERS) -> dict[str, list[str]]:
    """Row name -> Hydra overrides (``conf/memory_proof.yaml``; ``{w}``, ``{wm}``, ``{o}`` filled in when a row trains)."""
    import yaml

    spec = yaml.safe_load(PROOF_FILE.read_text())
    rows = {name: [str(o) for o in overrides] for name, overrides in spec["rows"].items()}
    if spec.get("recipe"):
        rows["recipe"] = recipe_row(spec["recipe"], num_layers)
    for name, overrides in rows.items():
        for o in overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if key != "ttt" and key not in SIZE_KEYS + SELECT_KEYS + TEACHER_KEYS:
                raise ValueError(f"{PROOF_FILE}: row {name!r} sets {key}, which is not a size: the proof trains the "
                                 "product's memory (change its default in conf/ttt or the schema instead)")
    return rows


VARIANTS = proof_rows()
#: What `make memory-proof` trains (one seed, under 20 minutes on 2 cores): the product's memories and the
#: recipe (four trainings, two at a time: the recipe is hybrid's run on 2 layers). The two baselines, Sun et
#: al.'s rule and post_attention (the failed port's placement), are in the three-seed run (``--variants`` with
#: every row: docs/memory-proof.md).
BASELINES = ("pre_attention_minibatch_gd", "post_attention")
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in BASELINES]


def training_cost(name: str, args) -> float:
    """A row's relative training time (for balancing the processes that train rows side by side): the share
    of the toy's layers it puts a TTT layer in (every row but the recipe: all of them)."""
    if name != "recipe":
        return 1.0
    row = dict(o.split("=", 1) for o in proof_rows(args.layers)["recipe"])
    indices = row.get("ttt.layer_indices")
    return 1.0 if indices in (None, "null") else max(0.2, len(indices.strip("[]").split(",")) / args.layers)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def _model_overrides(args, window: int | None = None) -> list[str]:
    return ["model=tiny", f"model.lm_kwargs.context={window or args.window}", f"model.lm_kwargs.dim={args.dim}",
            f"model.lm_kwargs.num_layers={args.layers}"]


def _stage(name: str, frames: int, steps: int, args) -> str:
    """A curriculum stage as a Hydra override value."""
    return (f"{{name:{name},seconds:{frames / 12.5},steps:{steps},batch_size:{args.batch_size},"
            f"lr:{args.ttt_lr},warmup_steps:{min(20, steps // 4)},min_lr_ratio:1.0}}")  # constant after warmup


def lookup_reach(pairs: int, gap: int) -> int:
    """The longest attention distance a query needs to reach its stated value (query position of
    the last asked value back to the position after the first stated value)."""
    return 4 * pairs + gap - 3


def gaps_within(window: int, pairs: int) -> range:
    """Every gap that keeps each lookup of ``pairs`` pairs inside ``window`` (``lookup_reach < window``)."""
    return range(0, window + 3 - 4 * pairs)


def pretrain_gaps(window: int, base_window: int, pairs: int) -> list[int]:
    """The base's second pretraining phase: half the conversations have every lookup inside
    ``window`` (where the lookup emerged), half at any distance up to ``base_window`` (so that it
    reaches every delay the proof asks, which the oracle needs)."""
    short, long = list(gaps_within(window, pairs)), list(gaps_within(base_window, pairs))
    return short * max(1, round(len(long) / len(short))) + long


def delay_gap(multiple: float, window: int, pairs: int) -> int:
    """The silent gap that puts the pairs, on average, ``multiple`` x the window before their queries."""
    return max(0, round(multiple * window) - 2 * pairs)


def _spec(gaps, pairs) -> PairsRecallSpec:
    return PairsRecallSpec(gaps=tuple(gaps), pairs=tuple(pairs), key_in_audio=True)


def _timings(out: Path) -> dict:
    path = out / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def trained_together(timings: dict, variants: list[str]) -> dict | None:
    """The timing of training exactly these variants side by side in one run (None: they were not)."""
    batch = timings.get(VARIANTS_WALL)
    return batch if batch and set(batch["variants"]) == set(variants) else None


def seconds_from_scratch(timings: dict, variants: list[str]) -> float:
    """Wall seconds of training and scoring from scratch: the base's phases, the scoring, and the
    variants' training (the wall time of training them together when one run trained them all at
    once; else the sum of their own times, as if one after the other)."""
    batch = trained_together(timings, variants)
    trained = batch["seconds"] if batch else sum(timings.get(v, 0.0) for v in variants)
    other = sum(v for k, v in timings.items() if k not in VARIANTS and k != VARIANTS_WALL)
    return trained + other


def _save_timing(out: Path, name: str, seconds: float | dict) -> None:
    timings = _timings(out)
    timings[name] = seconds
    (out / "timings.json").write_text(json.dumps(timings, indent=2))


def _trained(frozen: dict, ttt_cfg: dict, ckpt: Path):
    """The frozen base with the variant's TTT layers and the weights its run trained."""
    from moshi_ttt.models import build_model

    model = build_model(frozen, ttt_cfg)
    state = {k.removeprefix("model."): v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != trainable:
        raise ValueError(f"{ckpt}: holds {sorted(set(state) ^ trainable)[:5]} that do not match the variant's TTT "
                         "parameters (rerun without --reuse)")
    model.load_state_dict(state, strict=False)
    return model.eval()


def write_size(row: list[str]) -> int:
    """Frames per memory write of a row's config (the delta rule: 1; minibatch_gd: its mini-batch)."""
    from moshi_ttt.config.groups import ttt_settings

    cfg = _compose([o for o in row if "{" not in o])
    return int(ttt_settings(cfg.ttt).ttt_layer.resolved().mini_batch_size)


def row_overrides(row: list[str], window: int, oracle_window: int) -> list[str]:
    """A row's overrides with ``{w}`` (the base window), ``{wm}`` (it minus the row's write size) and ``{o}``
    (the oracle's window) filled in."""
    return [o.format(w=window, wm=window - write_size(row), o=oracle_window) for o in row]


def variant_config(variant: str, job: dict, run_name: str | None = None):
    """The training config of one row (``job``: what ``run_seed`` prepared): the frozen base, the proof's two
    stages and optimiser, and the row's overrides with its sizes filled in."""
    args, out = job["args"], job["out"]
    steps = args.variant_steps
    warm = max(1, steps // 10)
    return _compose([
        *_model_overrides(args), *_common(out), "curriculum=demo", f"seed={job['seed']}",
        f"run_name={run_name or variant}", "model.source=dir", f"model.path={job['base_dir']}",
        f"data.train_shards={out / 'pairs_train'}", "ttt.layer_indices=null", f"ttt.default_num_layers={args.layers}",
        f"curriculum.stages=[{_stage('in_window', job['short'], warm, args)},"
        f"{_stage('full', job['frames'], steps - warm, args)}]",
        f"optim.lr={args.ttt_lr}", "optim.weight_decay=0.0",
        # a compute size, like the model's: the delta engine's reads do not depend on it (tests/test_delta_rule.py),
        # and narrow heads (17-wide keys here) run fastest in short chunks on a CPU
        f"ttt.ttt_layer.chunk_size={args.chunk_size}",
        *([] if args.full_loss else ["loss.audio_weight=0.0", "loss.text_padding_weight=0.0"]),
        *row_overrides(job["rows"][variant], args.window, job["oracle_window"]),  # the row: the product's config and sizes
        *args.override,
    ])


def training_key(variant: str, job: dict) -> str:
    """What a row trains, its name aside and its TTT layers resolved: two rows with the same key would train
    the same run, step for step (the 7B recipe's layers [0, 16, 31] read onto a 2-layer toy are every layer,
    as in the ``hybrid`` row)."""
    from moshi_ttt.models.insert import selected_layers

    cfg = OmegaConf.to_container(variant_config(variant, job, run_name="row"), resolve=True)
    cfg["ttt"]["layer_indices"] = selected_layers(cfg["ttt"], job["args"].layers)
    cfg["ttt"].pop("default_num_layers", None)
    return json.dumps(cfg, sort_keys=True, default=str)


def twin_rows(variants: list[str], job: dict) -> dict[str, str]:
    """Row -> the earlier row (in ``variants``' order) that trains the same run: trained once, scored under both
    names."""
    first: dict[str, str] = {}
    twins = {}
    for v in variants:
        key = training_key(v, job)
        if key in first:
            twins[v] = first[key]
        else:
            first[key] = v
    return twins


def train_variant(variant: str, job: dict) -> float:
    """Train one row's TTT layers on the frozen base (``job``: what ``run`` prepared); writes its
    ``ttt/<variant>.json``; returns the seconds it took."""
    from moshi_ttt.training import train

    out = job["out"]
    t = time.perf_counter()
    cfg = variant_config(variant, job)
    summary = train(cfg)
    ttt_file = out / "ttt" / f"{variant}.json"
    ttt_file.parent.mkdir(exist_ok=True)
    ttt_file.write_text(json.dumps({"ckpt": str(Path(summary["checkpoint_dir"]) / "last.ckpt"),
                                    "ttt": OmegaConf.to_container(cfg.ttt, resolve=True)}))
    return time.perf_counter() - t


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")


def _train_in_turn(variants: list[str], job: dict) -> list[tuple[str, float]]:
    return [(v, train_variant(v, job)) for v in variants]


def balanced_groups(costs: dict[str, float], groups: int) -> list[list[str]]:
    """Split the rows into ``groups`` lists whose largest summed cost is the smallest possible
    (every assignment is tried for a handful of rows; else longest first onto the lightest list)."""
    names = sorted(costs, key=lambda v: -costs[v])
    groups = max(1, min(groups, len(names)))
    if groups ** len(names) <= 50_000:
        best, best_load = None, float("inf")
        for assign in itertools.product(range(groups), repeat=len(names)):
            if assign and assign[0] != 0:  # the groups are interchangeable: the first row goes to group 0
                break
            loads = [0.0] * groups
            for name, g in zip(names, assign):
                loads[g] += costs[name]
            if max(loads) < best_load:
                best, best_load = assign, max(loads)
        split = [[n for n, g in zip(names, best) if g == i] for i in range(groups)]
    else:
        split = [[] for _ in range(groups)]
        loads = [0.0] * groups
        for name in names:
            i = loads.index(min(loads))
            split[i].append(name)
            loads[i] += costs[name]
    return [g for g in split if g]


def train_variants(variants: list[str], job: dict, jobs: int):
    """Train ``variants`` (``train_variant``), ``jobs`` processes at a time, the CPUs shared among
    them (a tiny model barely gains from a second thread: 200 steps of ``add`` took 21.5 s on one
    thread and 18.6 s on two here, so two one-thread runs side by side train ~1.7x as many steps
    per second). Each process trains a group of rows in turn, the groups balanced by
    ``training_cost``; yields (variant, seconds)."""
    args = job["args"]
    if jobs <= 1 or len(variants) <= 1:
        for variant in sorted(variants, key=lambda v: -training_cost(v, args)):
            yield variant, train_variant(variant, job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    groups = balanced_groups({v: training_cost(v, args) for v in variants}, jobs)
    threads = max(1, available_cpus() // len(groups))
    logger.info("training %d variants in %d processes of %d thread(s): %s", len(variants), len(groups), threads,
                " | ".join(", ".join(g) for g in groups))
    with ProcessPoolExecutor(len(groups), mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        for done in as_completed([pool.submit(_train_in_turn, g, job) for g in groups]):
            yield from done.result()  # a failed run raises here, with its traceback


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _common(out: Path) -> list[str]:
    """The Hydra overrides of every training run of the proof (base and variants)."""
    return [f"paths.output_root={out}", "logger=csv", "data=shards", "data.num_workers=0", "data.min_frames=1",
            "data.random_crop=false", "data.val_shards=null", "data.resampled=true", "ckpt_path=null",
            "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.progress.every_n_steps=100",
            "loss.first_codebook_weight=1.0"]


def check_base(base, args, seed: int, out: Path) -> None:
    """Stop before any row trains when the frozen base has not learned the lookup inside its own window:
    beyond it no memory could then show anything (a 4-layer base missed it in 800 steps on seed 1)."""
    recall = min(recall_report(base, str(out / f"pairs_test_{n}_in"), max_samples=args.test_samples)["text_accuracy"]
                 for n in args.pairs)
    logger.info("seed %d: the frozen base recalls %.3f of the pairs inside its window", seed, recall)
    if recall < args.min_base_recall:
        raise SystemExit(f"memory proof, seed {seed}: the frozen base recalls {recall:.3f} of the pairs inside its own "
                         f"window (--min-base-recall {args.min_base_recall:g}): it has not learned the lookup, so no "
                         f"row could show a memory. Train it longer (--base-steps, now {args.base_steps}; the base is "
                         f"in {out}) or pick another seed.")


def run_seed(args, seed: int, out: Path) -> dict:
    """The whole proof with one seed (its shards, base, rows and scores) under ``out``."""
    from moshi_ttt.models import build_model, save_base_checkpoint
    from moshi_ttt.training import train

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    W, inside, n_max = args.window, args.inside_gap, max(args.pairs)
    pretrain = _spec(gaps_within(W, n_max), range(2, n_max + 1))  # every lookup inside the window
    train_pairs = args.train_pairs or args.pairs
    beyond = [delay_gap(args.train_delay, W, n) for n in train_pairs]
    variant_set = _spec([inside, inside, *beyond * 3], train_pairs)
    tests = {(n, "in"): _spec([inside], [n]) for n in args.pairs}
    tests.update({(n, f"{m:g}x"): _spec([delay_gap(m, W, n)], [n]) for n in args.pairs for m in args.delays})
    longest = max(lookup_reach(n, spec.gaps[0]) for (n, _), spec in tests.items()) + 1  # the oracle's window
    taught = max(lookup_reach(n, delay_gap(m, W, n)) for n in args.pairs for m in args.delays if m <= args.oracle_delay)
    base_window = args.base_window or taught + 1
    extend = _spec(pretrain_gaps(W, base_window, n_max), range(2, n_max + 1))
    shard_seed = 1000 * seed
    write_pairs_recall_shards(out / "pairs_pretrain", args.pretrain_samples, pretrain, seed=shard_seed + 1)
    write_pairs_recall_shards(out / "pairs_extend", args.pretrain_samples, extend, seed=shard_seed + 3)
    write_pairs_recall_shards(out / "pairs_train", args.train_samples, variant_set, seed=shard_seed + 2)
    for i, ((n, name), spec) in enumerate(tests.items()):
        write_pairs_recall_shards(out / f"pairs_test_{n}_{name}", args.test_samples, spec, seed=shard_seed + 10 + i)
    common = [*_common(out), f"seed={seed}"]

    # 1. the base: everything trains; the lookup is learned inside the short window, then extended to
    # every distance up to --base-window (the oracle needs it); then it is frozen with --window.
    def pretrain_phase(name, spec, shards, window, steps, batch_size, start_dir=None):
        source = ["model.source=dir", f"model.path={start_dir}"] if start_dir else [f"model.seed={seed}"]
        cfg = _compose([*_model_overrides(args, window), *common, *source, "ttt=none", "curriculum=none",
                        f"run_name={name}", "model.train_base=true", f"data.train_shards=[{shards}]",
                        f"data.seq_len={spec.frames()}", f"data.batch_size={batch_size}",
                        f"trainer.max_steps={steps}", f"optim.lr={args.base_lr}",
                        f"optim.warmup_steps={min(50, steps // 10)}", "optim.weight_decay=0.0",
                        "optim.min_lr_ratio=1.0"])  # constant after warmup
        ckpt = out / "runs" / name / "checkpoints" / "last.ckpt"
        if not (args.reuse and ckpt.exists()):
            t = time.perf_counter()
            train(cfg)
            _save_timing(out, name, time.perf_counter() - t)
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg.update(source="tiny", path=None)
        model_cfg["lm_kwargs"]["context"] = W  # saved with the proof's window
        model = build_model(model_cfg, {"variant": "none"})
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
        return model_cfg, save_base_checkpoint(model, model_cfg["lm_kwargs"], out / f"{name}_checkpoint")

    model_cfg, base_dir = pretrain_phase("base", pretrain, out / "pairs_pretrain", W, args.base_steps,
                                         args.base_batch_size)
    if args.base_extend_steps > 0:
        model_cfg, base_dir = pretrain_phase("base_extended", extend, out / "pairs_extend", base_window,
                                             args.base_extend_steps, args.extend_batch_size, start_dir=base_dir)
    frozen = {**model_cfg, "source": "dir", "path": str(base_dir), "train_base": False}
    check_base(build_model(frozen, {"variant": "none"}), args, seed, out)

    # 2. each row's TTT on the frozen base: in-window conversations first, then everything;
    # --jobs at once, each in its own process.
    models = {"frozen base": build_model(frozen, {"variant": "none"}),
              "oracle": build_model(frozen, {"variant": "none", "attention_window": longest})}
    job = {"args": args, "out": out, "base_dir": base_dir, "short": _spec([inside], args.pairs).frames(),
           "frames": variant_set.frames(), "seed": seed, "rows": proof_rows(args.layers), "oracle_window": longest}
    twins = twin_rows(list(args.variants), job)
    todo = [v for v in args.variants if v not in twins and not (
        args.reuse and (out / "runs" / v / "checkpoints" / "last.ckpt").exists() and (out / "ttt" / f"{v}.json").exists())]
    t = time.perf_counter()
    for variant, seconds in train_variants(todo, job, args.jobs):
        _save_timing(out, variant, seconds)
    if todo:  # the wall time of training these variants together (stale once one is retrained alone)
        _save_timing(out, VARIANTS_WALL, {"variants": sorted(todo), "jobs": min(args.jobs, len(todo)),
                                          "seconds": time.perf_counter() - t})
    for twin, trained_as in twins.items():  # the same run under another name: its checkpoint, the twin's config
        logger.info("seed %d: %s trains the same run as %s: scored from its checkpoint", seed, twin, trained_as)
        ckpt = json.loads((out / "ttt" / f"{trained_as}.json").read_text())["ckpt"]
        ttt = OmegaConf.to_container(variant_config(twin, job).ttt, resolve=True)
        (out / "ttt" / f"{twin}.json").write_text(json.dumps({"ckpt": ckpt, "ttt": ttt, "trained_as": trained_as}))
        _save_timing(out, twin, 0.0)
    for variant in args.variants:
        saved = json.loads((out / "ttt" / f"{variant}.json").read_text())
        models[variant] = _trained(frozen, saved["ttt"], Path(saved["ckpt"]))

    # 3. score every model on every set; late loss: the query block of each set.
    rows = []
    chance = 1 / len(next(iter(tests.values())).value_ids)
    for name, model in models.items():
        t = time.perf_counter()
        for n in args.pairs:
            row = {"model": name, "pairs": n, "chance": chance}
            for (m, label), spec in tests.items():
                if m != n:
                    continue
                shards = str(out / f"pairs_test_{n}_{label}")
                row[f"recall_{label}"] = recall_report(model, shards, max_samples=args.test_samples)["text_accuracy"]
                if label != "in":
                    row[f"late_loss_{label}"] = late_loss(model, shards, start_frame=1 + 2 * n + spec.gaps[0],
                                                          max_samples=args.test_samples)
            rows.append(row)
            logger.info("seed %d: scored %s: %s", seed, name, row)
        _save_timing(out, f"score {name}", time.perf_counter() - t)
    timings = _timings(out)
    delays = {f"{m:g}x": round(m * W) for m in args.delays}
    result = {"seed": seed, "window_frames": W, "pairs": list(args.pairs), "delays": delays, "inside_gap": inside,
              "in_window_reach": max(lookup_reach(n, inside) for n in args.pairs), "oracle_window": longest,
              "train_delay": args.train_delay, "variant_steps": args.variant_steps,
              "rows_config": {v: job["rows"][v] for v in args.variants}, "trained_as": twins,
              "seconds_this_run": time.perf_counter() - t0,
              "seconds_from_scratch": seconds_from_scratch(timings, [v for v in args.variants if v not in twins]),
              "timings": timings,
              "settings": {k: v for k, v in vars(args).items()}, "rows": rows}
    (out / "memory_proof.json").write_text(json.dumps(result, indent=2))
    return result


def combine_seeds(results: list[dict]) -> dict:
    """One result over seeds: each row's recall and late loss is the mean over seeds, with the min
    (``recall_<delay>_min``) and every seed's value (``per_seed``) beside it."""
    first = results[0]
    combined = {k: v for k, v in first.items() if k not in ("rows", "seed", "timings", "seconds_this_run",
                                                           "seconds_from_scratch")}
    combined["seeds"] = [r["seed"] for r in results]
    combined["seconds_from_scratch"] = sum(r["seconds_from_scratch"] for r in results)
    combined["seconds_per_seed"] = {str(r["seed"]): r["seconds_from_scratch"] for r in results}
    combined["timings"] = first["timings"] if len(results) == 1 else {}
    rows = []
    for i, row in enumerate(first["rows"]):
        same = [r["rows"][i] for r in results]
        if any((s["model"], s["pairs"]) != (row["model"], row["pairs"]) for s in same):
            raise ValueError("memory proof: the seeds' tables do not list the same rows")
        merged = {"model": row["model"], "pairs": row["pairs"], "chance": row["chance"]}
        for key in row:
            if key.startswith(("recall_", "late_loss_")):
                values = [s[key] for s in same]
                merged[key] = sum(values) / len(values)
                merged[f"{key}_min"] = min(values)
                merged.setdefault("per_seed", {})[key] = values
        rows.append(merged)
    combined["rows"] = rows
    return combined


def run(args) -> dict:
    out = Path(args.out).resolve()
    t0 = time.perf_counter()
    results = [run_seed(args, seed, out / f"seed_{seed}") for seed in args.seeds]
    result = combine_seeds(results)
    result["seconds_this_run"] = time.perf_counter() - t0
    (out / "memory_proof.json").write_text(json.dumps(result, indent=2))
    (out / "memory_proof.md").write_text(format_table(result))
    plot_recall_vs_delay(result, out / "recall_vs_delay.png")
    print(format_table(result), flush=True)
    return result


def _labels(result: dict) -> list[str]:
    return ["in", *result["delays"]]


def format_table(result: dict) -> str:
    """The table: recall per row, pair count and delay; over several seeds each cell is ``mean (min)``."""
    W, labels = result["window_frames"], _labels(result)
    late = list(result["delays"])
    seeds = result.get("seeds", [0])
    trained = [v for v in result["settings"]["variants"] if v not in (result.get("trained_as") or {})]
    batch = trained_together(result["timings"], trained) if len(seeds) == 1 else None
    together = f" (the rows {batch['jobs']} at a time)" if batch and batch["jobs"] > 1 else ""
    over = (f"seeds {', '.join(map(str, seeds))}: each cell the mean over seeds (the min in brackets), every seed "
            "with its own base; " if len(seeds) > 1 else f"seed {seeds[0]}; ")
    head = " | ".join(["recall inside the window", *(f"recall at {k} ({v} frames)" for k, v in result["delays"].items()),
                       "chance", *(f"late-query loss {k}" for k in late)])
    lines = [f"memory proof: attention window {W} frames; key/value pairs queried inside the window (at most "
             f"{result['in_window_reach']} frames back) or on average {', '.join(map(str, result['delays'].values()))} "
             f"frames after they were stated; rows trained {result['variant_steps']} steps at "
             f"{result['train_delay']:g}x; oracle: the frozen base with a {result['oracle_window']}-frame window; "
             f"{over}{result['seconds_from_scratch']:.0f} s of training and scoring from scratch on this "
             f"machine{together}", "",
             f"| model | pairs | {head} |", "| --- | ---: |" + " ---: |" * (len(labels) + 1 + len(late))]

    def cell(r: dict, key: str) -> str:
        value = r.get(key, float("nan"))
        return f"{value:.3f} ({r[key + '_min']:.3f})" if len(seeds) > 1 and key + "_min" in r else f"{value:.3f}"

    for r in result["rows"]:
        cells = [cell(r, f"recall_{k}") for k in labels] + [f"{r['chance']:.3f}"]
        cells += [f"{r.get('late_loss_' + k, float('nan')):.3f}" for k in late]
        lines.append(f"| {r['model']} | {r['pairs']} | " + " | ".join(cells) + " |")
    rows = result.get("rows_config") or {}
    if rows:
        lines += ["", "Rows (conf/memory_proof.yaml: the product's config and sizes): "
                  + "; ".join(f"{name}: {' '.join(o for o in overrides)}" for name, overrides in rows.items()) + "."]
    for twin, trained_as in (result.get("trained_as") or {}).items():
        lines += ["", f"{twin} composes the same training config as {trained_as} (its layers resolved): trained once, "
                      "the same checkpoint scored under both names."]
    return "\n".join(lines) + "\n"


def plot_recall_vs_delay(result: dict, path) -> None:
    """Recall against the mean distance between statement and query, one line per model and pair
    count, with the window and chance marked."""
    from matplotlib.figure import Figure

    W = result["window_frames"]
    xs = {"in": result["in_window_reach"] / 2, **result["delays"]}
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    styles = {n: s for n, s in zip(result["pairs"], ["-", "--", ":", "-."])}
    colors = {}
    for r in result["rows"]:
        color = colors.setdefault(r["model"], f"C{len(colors)}")
        pts = [(xs[k], r[f"recall_{k}"]) for k in _labels(result) if f"recall_{k}" in r]
        ax.plot(*zip(*pts), styles.get(r["pairs"], "-"), marker="o", color=color,
                label=f"{r['model']} ({r['pairs']} pairs)")
    ax.axvline(W, color="grey", lw=0.8)
    ax.text(W, 1.02, " window", color="grey", fontsize=8)
    ax.axhline(result["rows"][0]["chance"], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("frames between a pair and its query")
    ax.set_ylabel("recall (exact value)")
    ax.set_ylim(-0.02, 1.08)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a curve
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/memory_proof")
    p.add_argument("--window", type=int, default=32, help="attention window of the base (frames)")
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 8], help="key/value pairs per conversation")
    p.add_argument("--train-pairs", type=int, nargs="+", default=None,
                   help="pair counts the variants train on (default: --pairs)")
    p.add_argument("--delays", type=float, nargs="+", default=[4, 8, 16], help="query delays, in windows")
    p.add_argument("--train-delay", type=float, default=2,
                   help="the variants train at this delay (in windows; 2: shorter conversations, so more steps fit "
                        "the time, and a memory trained at 2x recalls as well at 4x and 8x)")
    p.add_argument("--inside-gap", type=int, default=1, help="silent frames before the queries, inside the window")
    p.add_argument("--base-window", type=int, default=None,
                   help="attention window of the base's second pretraining phase, whose pairs sit at every distance "
                        "up to it (default: what the delays up to --oracle-delay reach); then the base is frozen "
                        "with --window")
    p.add_argument("--oracle-delay", type=float, default=8,
                   help="the base learns lookups as far as this delay (in windows), so the oracle (the frozen base "
                        "with a window that covers every delay) shows the task is solvable there; beyond it the "
                        "oracle is reported as it comes (a 16x lookup would cost the base's pretraining 4x the time)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    p.add_argument("--batch-size", type=int, default=8, help="of the variants' training")
    p.add_argument("--base-batch-size", type=int, default=32)
    p.add_argument("--pretrain-samples", type=int, default=4096)
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--test-samples", type=int, default=64)
    p.add_argument("--base-steps", type=int, default=800, help="the lookup emerges after ~500 steps")
    p.add_argument("--min-base-recall", type=float, default=0.9,
                   help="stop before training the rows when the frozen base recalls less than this inside its window")
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--base-extend-steps", type=int, default=700,
                   help="then the base trains on pairs at every distance up to --base-window (0: skip)")
    p.add_argument("--extend-batch-size", type=int, default=16)
    p.add_argument("--variant-steps", type=int, default=2000, help="training steps of every row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run everything once per seed (its own shards, base and rows) and report the mean and min")
    p.add_argument("--ttt-lr", type=float, default=3e-3)
    p.add_argument("--chunk-size", type=int, default=16,
                   help="frames per chunk of the delta engine (speed only: the reads do not depend on it)")
    p.add_argument("--full-loss", action="store_true",
                   help="train the variants on Moshi's whole loss; default: the text words only (audio is a "
                        "constant silence and padding follows from the layout, so their gradients are noise here)")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more Hydra overrides for every row's training, after the row's own (an experiment: the "
                        "proof's table then no longer shows the product's memory)")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS), help="none: only the base")
    p.add_argument("--jobs", type=int, default=None,
                   help="variants trained at once, each in its own process with the CPUs shared among them (default: "
                        "one per CPU, at most one per variant; 1: one after the other in this process). The thread "
                        "count changes the float sums' order, so a variant's numbers move slightly with it")
    p.add_argument("--reuse", action="store_true", help="keep the base and variants already trained in --out")
    args = p.parse_args(argv)
    reach = max(lookup_reach(n, args.inside_gap) for n in args.pairs)
    if reach >= args.window:
        p.error(f"--inside-gap {args.inside_gap} with {max(args.pairs)} pairs needs a {reach + 1}-frame window: "
                f"it does not fit the --window {args.window}")
    if not any(m <= args.oracle_delay for m in args.delays):
        p.error(f"--oracle-delay {args.oracle_delay} is below every --delays: the base would learn no long lookup")
    if min(args.delays) < 1 or args.train_delay < 1:
        p.error("--delays and --train-delay are in windows and must be >= 1: the point is recall beyond the window")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs {args.jobs} must be >= 1")
    if args.jobs is None:
        args.jobs = max(1, min(available_cpus(), len(args.variants)))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
