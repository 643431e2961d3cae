"""Every GPU path of moshi-ttt on one CUDA GPU, within a total time budget, as one table.

Why: the CPU test suite cannot see bf16 training, FlexAttention, NCCL/DeepSpeed on CUDA, the
planner's memory figures or streaming speed; a user's first cluster job is where those break.
This runs each of them once at the product's real shapes and prints what it measured. The parts
run in the order of their value (``PARTS`` below, the registry; a new part is one entry there):

0. ``runtime``: the first row. Do moshi and this torch go together? The versions of torch,
   moshi, numpy (and of triton, lightning, hydra-core, omegaconf, deepspeed, webdataset,
   fla-core), the requirements of moshi's that this environment breaks (moshi 0.2.13 asks for
   torch < 2.10 and numpy < 2.3), and one forward of a tiny LMModel (moshi's 7B config shrunk)
   on the device: finite logits of the right shape. It runs whatever ``--parts`` says.
1. ``7B train step``: a Moshi-7B-shaped model (moshi's own 7B config, random weights, nothing
   downloaded) built on the meta device and materialised in bf16 on the GPU, each TTT variant
   inserted at its default layers (``install_ttt``), one optimizer step (forward + backward +
   AdamW, bf16 autocast, activation checkpointing) at 188, 3 750 and 22 500 frames: peak
   ``torch.cuda.max_memory_allocated`` and step time beside ``moshi_ttt.plan``'s estimate for the
   same shape (planner total minus its fixed CUDA/NCCL overhead; step time at the planner's MFU).
2. ``TTT layer``: ``moshi_ttt.ttt.TTTLayer`` at Moshi's width (32 heads x 128) in bf16 autocast,
   the product's delta rule (``ttt.ttt_layer.kernel=auto``: fla on CUDA) and Sun et al.'s rule
   (linear, mlp): tokens/s and achieved TFLOP/s (matmul FLOPs counted by torch's FlopCounterMode
   on the torch engine, recompute included) as a share of the GPU's bf16 peak
   (``training.module.peak_flops``).
3. ``delta engine``: flash-linear-attention's delta-rule kernels against the plain-torch engine
   (``moshi_ttt.ttt.delta``) at 32 heads x 128 (+ the bias row): reads, final state and every
   gradient within bf16 tolerance (plain, gated, and fla's one-frame recurrent kernel as LMGen
   calls it), then forward + backward frames/s of each at 3 750 and 22 500 frames. fla's rows
   say SKIP, with the reason, where it does not run (no CUDA, not installed, the gated backward
   on a Triton that refuses it).
4. ``flex vs sdpa``: compiled FlexAttention against the chunked SDPA path of
   ``moshi_ttt.models.attention.local_attention``: equal on small cases (with and without prefix
   slots), then forward + backward speed at Moshi's shape (32 heads x 128, window 3000).
5. ``LMGen stream``: moshi's LMGen (greedy) on the 7B shape with each variant, built as
   ``moshi_ttt.serving`` builds it, its zero-initialised adapter outputs given random values (so
   that the memory changes tokens): frames/s without and with CUDA graphs (moshi's default, which
   the server uses) against real time (12.5), and the graphed tokens must equal the eager ones.
6. ``Lightning``: ``train.py experiment=smoke`` (CSV logger: no W&B) with trainer=gpu, ddp,
   deepspeed_zero2 and deepspeed_zero3 (NCCL, one GPU): it trains (finite losses, non-zero
   gradient norms), and a run stopped half-way and resumed logs the same per-step losses as an
   uninterrupted run.

Time: ``--budget-s`` (default 480) bounds the whole check. Each part runs in its own process
under its own budget (``Part.budget_s`` x ``--budget-scale``, cut to what the total has left);
a part is started only while the total has at least its ``Part.min_s`` left, else its cases
are SKIP rows that say so, and the check goes on to the next part that still fits. A case that
fails, runs out of memory or crashes its process is reported as FAIL/OOM and the rest still
runs. ``--dry-run`` runs the same code on the CPU at tiny sizes (tests/test_gpu_check.py runs
it in CI). Without CUDA and without ``--dry-run`` it exits 2. Exit 1 when a case FAILs, OOMs or
times out; WARN (planner off by more than 15 %, streaming below real time, a package of the
check missing) and SKIP do not fail it. The table is also written as ``gpu_check.json`` and
``gpu_check.md`` under ``--out``; on a lent machine with no network,
``bench/gpu_check_device.sh`` installs what the image lacks from ``.gpu-wheels`` and runs this.

    python bench/gpu_check.py                  # on a CUDA machine (make gpu-check)
    python bench/gpu_check.py --dry-run --out /tmp/gc
    python bench/gpu_check.py --parts 1 4 --variants pre_attention --overrides ttt.ttt_layer.num_heads=8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # this checkout's package, whatever the venv points to
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

# Part numbers: the table's first column and --parts. The order of the runs is PARTS' order (by
# value), set at the end of the file; a new part takes the next free number.
RUNTIME, TRAIN_STEP, TTT_LAYER, DELTA, ATTENTION, STREAM, LIGHTNING = range(7)
DEFAULT_BUDGET_S = 480.0  # the whole check, parts' processes included (--budget-s)
PLANNER_TOLERANCE = 0.15  # the planner is "off" beyond +-15 %
STATUSES = ("PASS", "WARN", "FAIL", "OOM", "TIMEOUT", "SKIP")
FAILING = {"FAIL", "OOM", "TIMEOUT"}

# Hydra overrides of each variant (parts TRAIN_STEP and STREAM), on top of --overrides.
VARIANTS: dict[str, list[str]] = {
    "none": ["ttt=none"],
    "pre_attention": ["ttt=pre_attention"],
    "post_attention": ["ttt=post_attention"],
    "hybrid": ["ttt=hybrid"],
    "cache_replacement": ["ttt=cache_replacement"],
    "cache_replacement+kv_slots": ["ttt=cache_replacement", "ttt.memory_read=kv_slots"],
}

# Part LIGHTNING: the trainer config on a GPU machine, and its CPU stand-in for --dry-run.
TRAINERS: dict[str, tuple[list[str], list[str]]] = {
    "gpu": (["trainer=gpu"], ["trainer=cpu"]),
    "ddp": (["trainer=ddp", "trainer.devices=1"], ["trainer=ddp_sim"]),
    "deepspeed_zero2": (["trainer=deepspeed_zero2", "trainer.devices=1"], ["trainer=deepspeed_cpu_sim"]),
    "deepspeed_zero3": (["trainer=deepspeed_zero3", "trainer.devices=1"],
                        ["trainer=deepspeed_cpu_sim", "trainer.strategy.config.zero_optimization.stage=3"]),
}


# ---------------------------------------------------------------------------------------------
# settings and rows
# ---------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of every part: the product's shapes on a GPU, tiny ones for --dry-run."""

    dry_run: bool
    device: str
    model_overrides: list[str]
    lengths: list[int]  # TRAIN_STEP frames
    variants: list[str]
    attn_equal: dict  # ATTENTION equality case: B, H, T, D, window
    attn_speed: dict  # ATTENTION speed: H, D, window, lengths
    ttt_heads: int
    ttt_head_dim: int
    ttt_lengths: list[int]
    ttt_inners: list[str]  # delta (the product's memory) | linear | mlp (Sun et al.'s mini-batch rule)
    delta_equal_T: int  # DELTA: frames of the fla == torch cases (no multiple of fla's 64-frame chunk)
    delta_lengths: list[int]  # DELTA: frames of the speed cases
    trainers: list[str]
    train_steps: int
    cut_step: int
    resume_tol: float  # |loss difference| allowed, relative to the loss
    concurrent_launches: int
    stream_warmup: int
    stream_frames: int
    budgets: dict[int, float] = field(default_factory=dict)  # each part's own seconds (before the total cuts them)
    budget_s: float = DEFAULT_BUDGET_S  # the whole check
    peak_flops: float | None = None  # dense bf16 FLOP/s of the GPU (training.module.peak_flops)
    peak_note: str = ""  # why the peak is unknown
    gpu_memory_gib: float | None = None
    runtime_frames: int = 32  # RUNTIME's tiny forward


def make_settings(args: argparse.Namespace) -> Settings:
    """The sizes for this mode; the GPU's peak and memory are read here, once, so that workers
    need not import Lightning for them."""
    peak, peak_note = None, ""
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    else:
        try:  # the project and Lightning: if they do not import, RUNTIME's row says why
            from moshi_ttt.training.module import peak_flops

            peak = peak_flops()
        except Exception as exn:  # noqa: BLE001 - the check runs on without a peak
            peak_note = f"moshi_ttt.training.module.peak_flops: {_error(exn)}"
            print(f"gpu_check: bf16 peak unknown ({peak_note})", file=sys.stderr, flush=True)
    memory = None if args.dry_run else _gib(torch.cuda.get_device_properties(0).total_memory)
    variants, trainers = args.variants or list(VARIANTS), args.trainers or list(TRAINERS)
    budgets = {p.number: (600.0 if args.dry_run else p.budget_s) * args.budget_scale for p in PARTS}
    common = dict(budgets=budgets, budget_s=args.budget_s, peak_flops=peak, peak_note=peak_note)
    if args.dry_run:
        return Settings(
            dry_run=True, device="cpu", model_overrides=["model=tiny", "model.gradient_checkpointing=true",
                                                         *args.overrides],
            lengths=[32, 64, 96], variants=variants,
            attn_equal=dict(B=1, H=2, T=96, D=16, window=32), attn_speed=dict(H=2, D=16, window=32, lengths=[96]),
            ttt_heads=2, ttt_head_dim=16, ttt_lengths=[64], ttt_inners=["delta", "linear", "mlp"],
            delta_equal_T=40, delta_lengths=[64],
            trainers=trainers, train_steps=4, cut_step=2, resume_tol=1e-6 if args.resume_tol is None else args.resume_tol,
            concurrent_launches=2, stream_warmup=16, stream_frames=16, **common,
        )  # fmt: skip
    return Settings(
        dry_run=False, device="cuda", model_overrides=["model=moshiko_7b", *args.overrides],
        lengths=[188, 3750, 22500], variants=variants,
        attn_equal=dict(B=1, H=4, T=1000, D=64, window=256),
        attn_speed=dict(H=32, D=128, window=3000, lengths=[3750, 22500]),
        ttt_heads=32, ttt_head_dim=128, ttt_lengths=[3750, 22500], ttt_inners=["delta", "linear", "mlp"],
        delta_equal_T=300, delta_lengths=[3750, 22500],
        # bf16 autocast on CUDA: backward kernels with atomics (flash attention) are not bitwise
        # reproducible, so a resumed run may differ from a straight one by rounding.
        trainers=trainers, train_steps=8, cut_step=4, resume_tol=2e-3 if args.resume_tol is None else args.resume_tol,
        concurrent_launches=8, stream_warmup=16, stream_frames=48, gpu_memory_gib=memory, **common,
    )  # fmt: skip


@dataclass
class Row:
    part: int
    case: str
    status: str
    measured: str = ""
    reference: str = ""
    ratio: str = ""
    note: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Job:
    """What a part's worker gets besides the settings: where to write and when the parent stops it."""

    out_dir: Path
    deadline: float  # time.time()


class Events:
    """A worker's JSON-lines log: which case started, its rows, which case finished. Written and
    flushed line by line, so the parent still reads what a crashed or killed worker did."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **event) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")

    def row(self, row: Row) -> None:
        print(f"  [{part_name(row.part)}] {row.case}: {row.status} {row.measured} {row.note}".rstrip(),
              file=sys.stderr, flush=True)
        self.write(event="row", row=asdict(row))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
        return out


def _gib(n: float) -> float:
    return n / 2**30


def _error(exn: BaseException) -> str:
    text = f"{type(exn).__name__}: {exn}".replace("\n", " ")
    return text[:300]


def _is_oom(exn: BaseException) -> bool:
    return isinstance(exn, torch.OutOfMemoryError) or "out of memory" in str(exn).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return _gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def _fmt_gib(value: float | None) -> str:
    if value is None:
        return "n/a (CPU)"
    return f"{value:.2f} GiB" if value >= 0.1 else f"{value * 1024:.2f} MiB"


def within(ratio: float, tol: float = PLANNER_TOLERANCE) -> bool:
    return abs(ratio - 1.0) <= tol


# ---------------------------------------------------------------------------------------------
# the model of parts TRAIN_STEP and STREAM: meta device -> materialised -> the project's adapters
# ---------------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    from moshi_ttt.plan import compose_config

    return compose_config(overrides)


def plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def materialise_base(lm_kwargs: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """Moshi's LMModel built on the meta device (no memory, no init), then allocated on
    ``device`` and initialised there: every parameter by its module's initialiser, then moshi's
    own ``_init_weights`` on top. Frozen and in eval mode, as ``load_base_moshi`` leaves it."""
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import RMSNorm

    from moshi_ttt.models.loading import freeze
    from moshi_ttt.plan import _skip_init

    with torch.device("meta"), _skip_init():
        model = LMModel(**{**lm_kwargs, "device": "meta", "dtype": dtype})
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if not own:
                continue
            if isinstance(module, RMSNorm):
                module.alpha.fill_(1.0)  # its constructor's value
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                raise RuntimeError(f"materialise_base: no initialiser for {name} ({type(module).__name__}: {own})")
        model._init_weights()
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:  # to_empty leaves buffers uninitialised; moshi's LMModel has none today
        raise RuntimeError(f"materialise_base: buffers {buffers[:3]} would be left uninitialised")
    freeze(model)
    return model


def build_variant(cfg, device: str, serving: bool = False):
    """The configured model with random base weights: what ``build_model`` assembles after
    ``load_base_moshi`` (LoRA, linear-cost attention + the TTT variant, checkpointing flags);
    ``serving``: without activation checkpointing, as ``moshi_ttt.serving`` builds it."""
    from moshi_ttt.models.insert import install_ttt
    from moshi_ttt.models.loading import DTYPES, lm_kwargs_for
    from moshi_ttt.models.lora import apply_lora

    model_cfg, ttt_cfg = plain(cfg.model), plain(cfg.ttt)
    if serving:
        model_cfg["gradient_checkpointing"] = False
    dtype = DTYPES[str(model_cfg.get("dtype", "float32"))]
    model = materialise_base(lm_kwargs_for(model_cfg), device, dtype, int(model_cfg.get("seed", 0)))
    lora = model_cfg.get("lora") or {}
    apply_lora(model, int(lora.get("rank", 0)), float(lora.get("scaling", 2.0)), str(lora.get("modules", "transformer")))
    install_ttt(model, ttt_cfg)
    if model_cfg.get("gradient_checkpointing"):
        model.transformer.checkpointing = True
        if model.depformer is not None:
            model.depformer.checkpointing = True
    return model


def random_codes(model, frames: int, device: str, seed: int = 0) -> torch.Tensor:
    """[1, 17, T] codes in range: text < text_card, audio < card."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, model.text_card, (1, 1, frames), generator=g)
    audio = torch.randint(0, model.card, (1, model.num_codebooks - 1, frames), generator=g)
    return torch.cat([text, audio], 1).to(device)


# ---------------------------------------------------------------------------------------------
# part RUNTIME: does moshi import and run on this torch?
# ---------------------------------------------------------------------------------------------
# Distributions the check reads (moshi's own requirements are read from its metadata); a missing
# one is a WARN here (fla-core only on CUDA: its kernels need it), and the parts that need it fail
# on their own.
CHECK_DISTRIBUTIONS = ("torch", "numpy", "moshi", "triton", "lightning", "hydra-core", "omegaconf", "deepspeed",
                       "webdataset", "fla-core")
CUDA_ONLY_DISTRIBUTIONS = ("fla-core",)
# Whose own requirements must hold (a WARN naming them if not); moshi's are only reported: it runs
# here over a newer torch and numpy than it asks for, without its serving extras.
STRICT_REQUIREMENTS_OF = ("lightning", "hydra-core", "omegaconf", "deepspeed", "pydantic", "webdataset", "fla-core")
# moshi's 7B config (moshi.models.loaders._lm_kwargs) shrunk: the same code paths, a few MiB.
TINY_LM = dict(dim=64, num_heads=4, num_layers=2, card=64, text_card=64, depformer_dim=32,
               depformer_dim_feedforward=64, depformer_num_heads=2, depformer_num_layers=1)


def installed_versions(names=CHECK_DISTRIBUTIONS) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # with its local tag (+cu130)
    return out


def requirements(dist: str) -> list:
    """``dist``'s own requirements (packaging's Requirement) that apply here: no extras, no other
    platform's."""
    from importlib import metadata

    from packaging.requirements import Requirement

    reqs = [Requirement(text) for text in metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def broken_requirements(dist: str) -> list[str]:
    """``dist``'s requirements that the installed versions do not meet ("torch 2.11.0 (moshi wants
    <2.10,>=2.2.0)"; a missing one: "sphn missing")."""
    from importlib import metadata

    broken = []
    for req in requirements(dist):
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            broken.append(f"{req.name} missing")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            broken.append(f"{req.name} {have} ({dist} wants {req.specifier})")
    return broken


def part_runtime(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    for case in cases:
        events.write(event="start", case=case["id"])
        try:
            events.row(_runtime_row(s, case))
        except Exception as exn:  # noqa: BLE001 - moshi does not import or run here: that is the row
            versions = installed_versions()
            events.row(Row(RUNTIME, case["id"], "OOM" if _is_oom(exn) else "FAIL",
                           ", ".join(f"{k} {versions[k]}" for k in ("torch", "moshi", "numpy")), note=_error(exn),
                           data={"versions": versions}))
        _free_memory()
        events.write(event="done", case=case["id"])


def _runtime_row(s: Settings, case: dict) -> Row:
    """moshi imported, its LMModel built (its 7B config shrunk) and run forward once on the device."""
    import platform

    t0 = time.perf_counter()
    import moshi
    from moshi.models import loaders
    from moshi.models.lm import LMModel

    import_s = time.perf_counter() - t0
    versions = installed_versions()
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    dtype = torch.bfloat16 if s.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = LMModel(**{**loaders._lm_kwargs, **TINY_LM}, device=s.device, dtype=dtype).eval()
    codes = random_codes(model, s.runtime_frames, s.device)
    with torch.no_grad():
        model(codes)  # the first call pays CUDA's and the allocator's start
        _sync(s.device)
        t0 = time.perf_counter()
        out = model(codes)
        _sync(s.device)
    forward_s = time.perf_counter() - t0
    T = codes.shape[-1]
    want = (1, model.dep_q, T, model.card)
    if tuple(out.logits.shape) != want:
        raise ValueError(f"LMModel logits {tuple(out.logits.shape)}, expected {want}")
    valid = out.logits[out.mask.bool()]
    text_valid = out.text_logits[out.text_mask.bool()]
    if valid.numel() == 0 or not torch.isfinite(valid).all() or not torch.isfinite(text_valid).all():
        raise FloatingPointError("LMModel forward: no or non-finite logits at the valid positions")
    broken = broken_requirements("moshi")
    missing = [k for k in CHECK_DISTRIBUTIONS if versions[k] is None]
    warn = [k for k in missing if s.device.startswith("cuda") or k not in CUDA_ONLY_DISTRIBUTIONS]
    unmet = {}
    for dist in STRICT_REQUIREMENTS_OF:
        with contextlib.suppress(Exception):  # not installed: named in "missing"
            if bad := broken_requirements(dist):
                unmet[dist] = bad
    notes = [f"tiny LMModel ({model.num_codebooks} codebooks, {T} frames, {dtype}) forward {1e3 * forward_s:.1f} ms "
             f"on {s.device}, logits finite; import moshi {import_s:.1f} s"]
    if broken:
        notes.append("outside moshi's requirements: " + ", ".join(broken))
    others = [f"{k} {versions[k]}" for k in CHECK_DISTRIBUTIONS if k not in ("torch", "numpy", "moshi") and versions[k]]
    notes.append(", ".join([f"python {versions['python']}", *others]))
    if missing:
        notes.append("missing: " + ", ".join(missing) + ("" if warn else " (not needed on the CPU)"))
    if unmet:
        notes.append("unmet requirements: " + "; ".join(f"{d}: {', '.join(b)}" for d, b in unmet.items()))
    if s.peak_note:
        notes.append(s.peak_note)
    wants = {r.name: str(r.specifier) for r in requirements("moshi")}
    reference = "moshi wants " + ", ".join(f"{k} {wants[k]}" for k in ("torch", "numpy") if wants.get(k))
    data = {"versions": versions, "moshi_broken_requirements": broken, "missing": missing, "unmet": unmet,
            "import_s": import_s,
            "forward_s": forward_s, "logits_shape": list(out.logits.shape)}
    return Row(RUNTIME, case["id"], "WARN" if warn or unmet else "PASS",
               f"torch {versions['torch']}, moshi {moshi.__version__}, numpy {versions['numpy']}", reference,
               "", "; ".join(notes), data)


# ---------------------------------------------------------------------------------------------
# part TRAIN_STEP: one training step of the 7B shape against the planner
# ---------------------------------------------------------------------------------------------
def autocast_dtype(trainer_cfg: dict) -> torch.dtype | None:
    """The autocast Lightning's precision plugin would use for ``trainer.precision``."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def train_step(model, optimizer, codes: torch.Tensor, amp: torch.dtype | None) -> float:
    """What one Lightning optimizer step does: forward + Moshi's loss under autocast, backward,
    AdamW, gradients set to None."""
    from moshi_ttt.training.loss import LossConfig, moshi_loss

    with torch.autocast(codes.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(codes)
        pads = (model.text_padding_token_id, model.end_of_text_padding_id)
        loss = moshi_loss(out, codes, LossConfig(), pads, model.audio_offset).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def planner_estimates(cfg, frames: list[int], s: Settings) -> dict[int, dict]:
    """``moshi_ttt.plan`` for this config on one GPU of this kind, batch 1, each length (its step
    time only when the GPU's peak FLOP/s is known)."""
    from dataclasses import replace

    from moshi_ttt import plan as P

    inputs = P.prepare(cfg)
    flops = s.peak_flops
    hw = P.Hardware(gpus=1, gpu_memory_gib=s.gpu_memory_gib or 1e6, gpu_flops=flops or 989e12)
    out = {}
    for T in frames:
        stage = replace(inputs.stages[0], frames=T, batch_size=1, accumulate=1, window=None)
        plan = inputs.run(hw, stages=[stage])[0]
        out[T] = {"memory_gib": plan.total - plan.overhead, "step_s": plan.step_time_s if flops else None,
                  "mfu": hw.mfu, "executed_flops": plan.executed_flops_per_frame * T}
    return out


def part_train_step(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    for case in cases:
        variant = case["id"]
        events.write(event="start", case=variant)
        trainer = ["trainer=cpu"] if s.dry_run else ["trainer=gpu"]
        model = optimizer = None
        try:
            cfg = compose([*s.model_overrides, *VARIANTS[variant], *trainer, "curriculum=none", "data.batch_size=1"])
            try:
                plans = planner_estimates(cfg, s.lengths, s)
            except ValueError as exn:
                if "nothing to train" not in str(exn):
                    raise
                events.row(Row(TRAIN_STEP, variant, "SKIP", note=f"not run: {str(exn).split(':')[0]} in this config"))
                events.write(event="done", case=variant)
                continue
            amp = autocast_dtype(plain(cfg.trainer))
            t0 = time.perf_counter()
            model = build_variant(cfg, s.device).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                          betas=(0.9, 0.95))  # no other reference: freed with the model
            build_s = time.perf_counter() - t0
        except Exception as exn:  # noqa: BLE001 - reported, the next variant still runs
            status = "OOM" if _is_oom(exn) else "FAIL"
            events.row(Row(TRAIN_STEP, f"{variant} (build)", status, note=_error(exn)))
            del model, optimizer
            _free_memory()
            events.write(event="done", case=variant)
            continue
        failed_at = None
        for T in s.lengths:
            label = f"{variant} T={T}"
            plan = plans[T]
            ref = f"plan {_fmt_gib(plan['memory_gib'])}" + (f", {plan['step_s']:.3g} s" if plan["step_s"] else "")
            if failed_at is not None:
                events.row(Row(TRAIN_STEP, label, "SKIP", reference=ref, note=f"not run: T={failed_at} already failed"))
                continue
            codes = random_codes(model, T, s.device)
            try:
                times, losses = [], []
                for _ in range(2):  # the first step at a length also pays the allocator's growth
                    _sync(s.device)
                    _reset_peak(s.device)
                    resident = _gib(torch.cuda.memory_allocated()) if s.device.startswith("cuda") else None
                    t0 = time.perf_counter()
                    losses.append(train_step(model, optimizer, codes, amp))
                    _sync(s.device)
                    times.append(time.perf_counter() - t0)
                peak = _peak_gib(s.device)
            except Exception as exn:  # noqa: BLE001
                failed_at = T
                optimizer.zero_grad(set_to_none=True)
                _free_memory()
                status = "OOM" if _is_oom(exn) else "FAIL"
                events.row(Row(TRAIN_STEP, label, status, reference=ref, note=_error(exn)))
                continue
            step_s = times[-1]
            data = {"frames": T, "peak_gib": peak, "resident_gib": resident, "step_s": step_s,
                    "build_s": build_s, "loss": losses[-1], "plan": plan}
            ratios, notes, status = [], [], "PASS"
            if not all(math.isfinite(v) for v in losses):
                status, notes = "FAIL", [f"non-finite loss {losses}"]
            if peak is not None:
                mem_ratio = peak / plan["memory_gib"]
                data["memory_ratio"] = mem_ratio
                ratios.append(f"mem {mem_ratio:.2f}x")
                if not within(mem_ratio) and status == "PASS":
                    status = "WARN"
                    notes.append(f"planner memory off by {100 * (mem_ratio - 1):+.0f} %")
            if plan["step_s"]:
                time_ratio = step_s / plan["step_s"]
                data["time_ratio"] = time_ratio
                implied = plan["mfu"] * plan["step_s"] / step_s  # the MFU at which the planner's time is right
                data["implied_mfu"] = implied
                ratios.append(f"time {time_ratio:.2f}x")
                notes.append(f"MFU {implied:.2g} (plan {plan['mfu']:.2g})")
                if not within(time_ratio) and status == "PASS" and not s.dry_run:
                    status = "WARN"
            measured = f"peak {_fmt_gib(peak)}, {step_s:.3g} s"
            events.row(Row(TRAIN_STEP, label, status, measured, ref, ", ".join(ratios), "; ".join(notes), data))
        del model, optimizer
        _free_memory()
        events.write(event="done", case=variant)


# ---------------------------------------------------------------------------------------------
# part ATTENTION: FlexAttention against chunked SDPA
# ---------------------------------------------------------------------------------------------
def attend(q, k, v, window: int, backend: str, compiled: bool, prefix=None, chunk: int | None = None):
    """``local_attention`` with ``backend``. FlexAttention runs compiled on CUDA only (as in
    training: ``flex_available``); the dry run calls the same FlexAttention kernel and block mask
    eagerly on the CPU."""
    from moshi_ttt.models import attention as A

    prefix_k, prefix_v = prefix if prefix is not None else (None, None)
    if backend != "flex" or compiled:
        if backend == "flex" and not A.flex_available(q.device):
            raise RuntimeError("FlexAttention unavailable here (moshi_ttt.models.attention.flex_available: needs "
                               "CUDA, torch.nn.attention.flex_attention and NO_TORCH_COMPILE unset)")
        return A.local_attention(q, k, v, window, chunk_size=chunk, prefix_k=prefix_k, prefix_v=prefix_v,
                                 backend=backend)
    T = q.shape[2]
    effective = min(window, T)
    plan = A._Plan(length=T, window=effective, chunk=chunk or A.default_chunk_size(effective),
                   scale=q.shape[-1] ** -0.5, kernel="sdpa")
    pk, pv, pm = A._canonical_prefix(prefix_k, prefix_v, None, q, plan.num_blocks, chunk is not None)
    return A._flex_local_attention(q, k, v, plan, pk, pv, pm, False, compiled=False)[0]


def _fwd_bwd(q, k, v, grad, window, backend, compiled, prefix=None, chunk=None, backward=True):
    """Forward + backward: (output, input gradients); ``backward=False``: the forward alone, with no
    input asking for a gradient (no gradients)."""
    if not backward:
        with torch.no_grad():
            out = attend(q.detach(), k.detach(), v.detach(), window, backend, compiled,
                         [t.detach() for t in prefix] if prefix else None, chunk)
        return out, []
    for t in (q, k, v, *(prefix or ())):
        t.grad = None
    out = attend(q, k, v, window, backend, compiled, prefix, chunk)
    out.backward(grad)
    grads = [t.grad for t in (q, k, v, *(prefix or ()))]
    return out.detach(), grads


def eager_flex_backward(device: str) -> bool:
    """Whether uncompiled FlexAttention has a backward here: torch 2.9 has one on the CPU, torch
    2.11 refuses (NotImplementedError); compiled on CUDA, it always has."""
    if device.startswith("cuda"):
        return True
    x = torch.randn(1, 1, 16, 8, requires_grad=True)
    try:
        attend(x, x, x, 8, "flex", False).sum().backward()
    except NotImplementedError:
        return False
    return True


def part_attention(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    device, compiled = s.device, not s.dry_run
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    backward = compiled or eager_flex_backward(device)  # else both backends run forward only
    for case in cases:
        events.write(event="start", case=case["id"])
        try:
            if case["kind"] == "equal":
                events.row(_attention_equal(s, case, device, dtype, compiled, backward))
            else:
                events.row(_attention_speed(s, case, device, dtype, compiled, backward))
        except Exception as exn:  # noqa: BLE001
            events.row(Row(ATTENTION, case["id"], "OOM" if _is_oom(exn) else "FAIL", note=_error(exn)))
        _free_memory()
        events.write(event="done", case=case["id"])


NO_EAGER_FLEX_BACKWARD = f"forward only: torch {torch.__version__}'s uncompiled FlexAttention has no backward on the CPU"


def _attention_equal(s: Settings, case: dict, device: str, dtype: torch.dtype, compiled: bool,
                     backward: bool = True) -> Row:
    """flex and sdpa against an fp32 reference: flex must be as close to it as sdpa is."""
    e = s.attn_equal
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, T, D, W = e["B"], e["H"], e["T"], e["D"], e["window"]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    base = [rand(B, H, T, D) for _ in range(3)]
    grad = rand(B, H, T, D)
    chunk = prefix = None
    if case["prefix"]:  # kv_slots' layout: one set of slots per query block
        chunk = max(8, W // 2)
        blocks = math.ceil(T / chunk)
        prefix = [rand(B, H, blocks, 4, D) for _ in range(2)]

    def run(backend, dt, comp):
        q, k, v = (t.to(dt).requires_grad_() for t in base)
        pre = [t.to(dt).requires_grad_() for t in prefix] if prefix else None
        out, grads = _fwd_bwd(q, k, v, grad.to(dt), W, backend, comp, pre, chunk, backward)
        return out.float(), [x.float() for x in grads]

    ref_out, ref_grads = run("math", torch.float32, False)
    errors, outs = {}, {}
    for backend in ("sdpa", "flex"):
        outs[backend], grads = run(backend, dtype, compiled if backend == "flex" else False)
        errors[backend] = max([(outs[backend] - ref_out).abs().max().item()]
                              + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
    errors["flex_vs_sdpa_out"] = (outs["flex"] - outs["sdpa"]).abs().max().item()
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    ok = errors["flex"] <= 2 * errors["sdpa"] + atol
    return Row(ATTENTION, case["id"], "PASS" if ok else "FAIL",
               f"flex err {errors['flex']:.2e} (|flex-sdpa| out {errors['flex_vs_sdpa_out']:.2e})",
               f"sdpa err {errors['sdpa']:.2e}", "",
               f"vs fp32 reference, {'out + grads' if backward else 'out'}, {dtype}, T={T} W={W}"
               + (", eager flex (CPU)" if not compiled else "") + ("" if backward else f"; {NO_EAGER_FLEX_BACKWARD}"),
               errors)


def _attention_speed(s: Settings, case: dict, device: str, dtype: torch.dtype, compiled: bool,
                     backward: bool = True) -> Row:
    a = s.attn_speed
    T, H, D, W = case["T"], a["H"], a["D"], a["window"]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(1, H, T, D, generator=g).to(device, dtype)
    res = {}
    for backend in ("sdpa", "flex"):
        comp = compiled if backend == "flex" else False
        t0 = time.perf_counter()
        _fwd_bwd(q, k, v, grad, W, backend, comp, backward=backward)  # warm-up: compilation, block mask, allocator
        _sync(device)
        res[f"{backend}_first_s"] = time.perf_counter() - t0
        best = math.inf
        _reset_peak(device)
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            _fwd_bwd(q, k, v, grad, W, backend, comp, backward=backward)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        res[f"{backend}_s"] = best
        res[f"{backend}_peak_gib"] = _peak_gib(device)
    speedup = res["sdpa_s"] / res["flex_s"]
    note = (f"{'fwd+bwd' if backward else 'fwd'}, {H}x{D} heads, W={W}, first flex call {res['flex_first_s']:.1f} s"
            + (" (compile)" if compiled else " (eager, CPU)") + ("" if backward else f"; {NO_EAGER_FLEX_BACKWARD}"))
    if res["flex_peak_gib"] is not None:
        note += f", peak flex {res['flex_peak_gib']:.2f} / sdpa {res['sdpa_peak_gib']:.2f} GiB"
    return Row(ATTENTION, case["id"], "PASS", f"flex {1e3 * res['flex_s']:.1f} ms", f"sdpa {1e3 * res['sdpa_s']:.1f} ms",
               f"flex {speedup:.2f}x faster" if speedup >= 1 else f"flex {1 / speedup:.2f}x slower", note, res)


# ---------------------------------------------------------------------------------------------
# part TTT_LAYER: the TTT layer at Moshi's width
# ---------------------------------------------------------------------------------------------
def part_ttt_layer(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ttt_layer import build, fwd_bwd  # bench/ttt_layer.py: the layer bench's builder and step

    from moshi_ttt.ttt import TTTConfig, TTTLayer

    peak = s.peak_flops
    flops_per_token: dict[str, float] = {}
    for case in cases:
        events.write(event="start", case=case["id"])
        inner, T = case["inner"], case["T"]
        try:
            torch.manual_seed(0)
            if inner == "delta":  # the product's memory: kernel auto (fla on CUDA when it imports)
                cfg = TTTConfig(rule="delta", num_heads=s.ttt_heads, head_dim=s.ttt_head_dim)
                layer = TTTLayer(cfg, s.ttt_heads * s.ttt_head_dim, name="bench").to(s.device)
                with torch.no_grad():
                    layer.out_proj.weight.normal_(0, 0.02)
            else:
                layer = build(inner, s.ttt_heads, s.ttt_head_dim, s.device, 16)
            dim, b = layer.dim, max(layer.memory.mini_batch_size, 64)
            if inner not in flops_per_token:  # counted on the torch engine: Triton kernels are invisible to it
                kernel = layer.memory.config.kernel
                layer.memory.config.kernel = "torch"
                xf = torch.randn(1, 8 * b, dim, device=s.device, requires_grad=True)
                with FlopCounterMode(display=False) as counter:
                    fwd_bwd(layer, xf, "bf16")
                flops_per_token[inner] = counter.get_total_flops() / (8 * b)
                layer.memory.config.kernel = kernel
            x = torch.randn(1, T, dim, device=s.device, requires_grad=True)
            fwd_bwd(layer, x, "bf16")  # warm-up at this length
            _reset_peak(s.device)
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                y = fwd_bwd(layer, x, "bf16")  # synchronises on CUDA
                best = min(best, time.perf_counter() - t0)
            if not torch.isfinite(y).all():
                raise FloatingPointError(f"non-finite TTT output at T={T}")
            tokens_s = T / best
            tflops = flops_per_token[inner] * T / best / 1e12
            share = f"{100 * tflops * 1e12 / peak:.1f} % of peak" if peak else "peak unknown"
            data = {"tokens_per_s": tokens_s, "tflops": tflops, "peak_tflops": peak / 1e12 if peak else None,
                    "flops_per_token": flops_per_token[inner], "fwd_bwd_s": best, "peak_gib": _peak_gib(s.device)}
            events.row(Row(TTT_LAYER, case["id"], "PASS", f"{tokens_s:,.0f} tok/s, {tflops:.3g} TFLOP/s",
                           f"bf16 peak {peak / 1e12:.3g} TFLOP/s" if peak else "", share,
                           f"{s.ttt_heads}x{s.ttt_head_dim}, fwd+bwd {best:.3g} s, peak {_fmt_gib(data['peak_gib'])}",
                           data))
            del layer, x
        except Exception as exn:  # noqa: BLE001
            events.row(Row(TTT_LAYER, case["id"], "OOM" if _is_oom(exn) else "FAIL", note=_error(exn)))
        _free_memory()
        events.write(event="done", case=case["id"])


# ---------------------------------------------------------------------------------------------
# part DELTA: the delta-rule engine, flash-linear-attention's kernels against the torch engine
# ---------------------------------------------------------------------------------------------
def _delta_inputs(s: Settings, T: int, seed: int = 0, decay: bool = False):
    """One memory's streams at the check's head shape, keys and queries with their bias row (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, d = s.ttt_heads, s.ttt_head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(s.device)

    one = torch.ones(1, H, T, 1, device=s.device)
    q = torch.cat([torch.nn.functional.normalize(rand(1, H, T, d), dim=-1), one], -1)
    k = torch.cat([torch.nn.functional.normalize(rand(1, H, T, d), dim=-1), one], -1)
    v, beta, state = rand(1, H, T, d), torch.sigmoid(rand(1, H, T)), 0.1 * rand(1, H, d + 1, d)
    log_decay = -torch.nn.functional.softplus(rand(1, H, T) - 6.0) if decay else None
    return q, k, v, beta, state, log_decay


def _delta_fwd_bwd(engine, inputs, seed: int = 1):
    """Reads, final state and the gradient of every input of a fixed random projection of both."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out, state = engine(*inputs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g).to(out.device)
    w_state = torch.randn(state.shape, generator=g).to(out.device)
    grads = torch.autograd.grad((out.float() * w_out).sum() + (state.float() * w_state).sum(),
                                [t for t in inputs if t is not None])
    return [out.detach(), state.detach(), *grads]


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def part_delta(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    for case in cases:
        events.write(event="start", case=case["id"])
        try:
            _delta_case(s, case, events)
        except Exception as exn:  # noqa: BLE001
            events.row(Row(DELTA, case["id"], "OOM" if _is_oom(exn) else "FAIL", note=_error(exn)))
        _free_memory()
        events.write(event="done", case=case["id"])


def _delta_case(s: Settings, case: dict, events: Events) -> None:
    """One case of part DELTA: its row (SKIP, with the reason, where fla cannot run)."""
    from functools import partial

    from moshi_ttt.ttt import fla_kernels
    from moshi_ttt.ttt.delta import chunk_delta_rule

    names = ("reads", "state", "dq", "dk", "dv", "dbeta", "dS0", "dlog_decay")
    tol = 3e-2  # bf16 inputs (fla) against fp32 throughout (torch): relative Frobenius error
    decay = case.get("decay", False)
    reason = fla_kernels.unavailable_reason(torch.device(s.device), torch.float32, s.ttt_head_dim + 1, 0, decay)
    if case["kind"] == "speed" and case["engine"] == "torch":
        reason = None
    if reason is not None:
        events.row(Row(DELTA, case["id"], "SKIP", note=f"fla does not run here: {reason}"))
        return
    if case["kind"] == "equal":
        inputs = _delta_inputs(s, case["T"], decay=decay)
        # torch on the bf16-rounded inputs: what differs is then the kernels, not the rounding
        rounded = [None if t is None else t.to(torch.bfloat16).float() for t in inputs[:4]]
        torch_out = _delta_fwd_bwd(chunk_delta_rule, [*rounded, *inputs[4:]])
        if case.get("stream"):  # fla's recurrent kernel, one frame per call, as LMGen runs it
            def streamed(q, k, v, beta, state, log_decay=None):
                outs = []
                for t in range(q.shape[2]):
                    sl = slice(t, t + 1)
                    o, state = fla_kernels.fla_chunk_delta_rule(
                        q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], state,
                        None if log_decay is None else log_decay[:, :, sl])
                    outs.append(o)
                return torch.cat(outs, 2), state
            with torch.no_grad():
                got = list(streamed(*inputs))
            want = torch_out[:2]
        else:
            got = _delta_fwd_bwd(fla_kernels.fla_chunk_delta_rule, inputs)
            want = torch_out
        errors = {n: _rel_error(a, b) for n, a, b in zip(names, got, want)}
        worst = max(errors, key=errors.get)
        status = "PASS" if errors[worst] <= tol else "FAIL"
        events.row(Row(DELTA, case["id"], status, f"worst rel. error {errors[worst]:.2e} ({worst})",
                       f"<= {tol:g}", "", ", ".join(f"{n} {e:.1e}" for n, e in errors.items()),
                       {"errors": errors}))
        return
    T, engine_name = case["T"], case["engine"]
    # the torch engine as the product runs it: checkpoint groups of 16 chunks
    engine = (partial(chunk_delta_rule, checkpoint_group_size=16) if engine_name == "torch"
              else fla_kernels.fla_chunk_delta_rule)
    inputs = _delta_inputs(s, T)
    _delta_fwd_bwd(engine, inputs)  # warm-up (Triton compiles here)
    _sync(s.device)
    _reset_peak(s.device)
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        _delta_fwd_bwd(engine, inputs)
        _sync(s.device)
        best = min(best, time.perf_counter() - t0)
    data = {"fwd_bwd_s": best, "frames_per_s": T / best, "peak_gib": _peak_gib(s.device)}
    events.row(Row(DELTA, case["id"], "PASS", f"{T / best:,.0f} frames/s", "", "",
                   f"{s.ttt_heads}x{s.ttt_head_dim}, fwd+bwd {best:.3g} s, peak {_fmt_gib(data['peak_gib'])}",
                   data))


def _delta_cases(s: Settings) -> list[dict]:
    T = s.delta_equal_T
    cases = [{"id": f"fla == torch T={T}", "kind": "equal", "T": T},
             {"id": f"fla == torch T={T} decay", "kind": "equal", "T": T, "decay": True},
             {"id": "fla recurrent == torch T=8, one frame a call", "kind": "equal", "T": 8, "stream": True}]
    for T in s.delta_lengths:
        cases += [{"id": f"speed {e} T={T}", "kind": "speed", "engine": e, "T": T} for e in ("torch", "fla")]
    return cases


# ---------------------------------------------------------------------------------------------
# part LIGHTNING: train.py through Lightning, straight vs stopped + resumed
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(s: Settings, trainer: str, root: Path, run_name: str, steps: int, log: Path) -> subprocess.Popen:
    overrides = TRAINERS[trainer][1 if s.dry_run else 0]
    env = {**os.environ, "MOSHI_TTT_OUTPUT": str(root), "NO_TORCH_COMPILE": "1", "WANDB_MODE": "offline",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    if s.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "train.py", "experiment=smoke", *overrides, f"run_name={run_name}",
           f"trainer.max_steps={steps}", f"optim.total_steps={s.train_steps}", "data.val_shards=null",
           f"callbacks.model_checkpoint.every_n_train_steps={s.cut_step}"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


_LAUNCHED: list[subprocess.Popen] = []  # train.py runs of this worker, each in its own process group


def _kill_launched(*_signal) -> None:
    """SIGTERM from the parent (budget spent): take the train.py runs (and their DDP ranks) down too."""
    for proc in _LAUNCHED:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    if _signal:
        os._exit(143)


def _run_all(s: Settings, launches: list[tuple], deadline: float) -> dict:
    """Run (key, trainer, root, run_name, steps, log) launches, ``s.concurrent_launches`` at a time,
    until ``deadline`` (``time.time()``); key -> (exit code or "timeout", seconds)."""
    pending, running, results = list(launches), {}, {}
    while pending or running:
        while pending and len(running) < s.concurrent_launches:
            key, *spec = pending.pop(0)
            proc = _launch(s, *spec)
            _LAUNCHED.append(proc)
            running[key] = (proc, time.perf_counter())
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                results[key] = (proc.returncode, time.perf_counter() - t0)
                del running[key]
            elif time.time() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                results[key] = ("timeout", time.perf_counter() - t0)
                del running[key]
        time.sleep(0.2)
    return results


def _log_tail(path: Path, n: int = 3) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return " | ".join((errors or lines)[-n:])[:300]


def compare_resume(straight_dir: Path, resumed_dir: Path, steps: int, cut: int, tol: float) -> tuple[str, str, dict]:
    """(status, message, data): the resumed run's per-step losses against the straight run's."""
    import csv

    from moshi_ttt.training.metrics_io import read_csv_metrics

    a, b = read_csv_metrics(straight_dir), read_csv_metrics(resumed_dir)
    la, lb = a.get("train/loss", {}), b.get("train/loss", {})
    expected = list(range(steps))
    if sorted(la) != expected or sorted(lb) != expected:
        return "FAIL", f"logged steps straight {sorted(la)}, resumed {sorted(lb)}; expected 0..{steps - 1}", {}
    attempts = sorted(resumed_dir.glob("csv/*/metrics.csv"))
    first_resumed = None
    if len(attempts) >= 2:
        with open(attempts[-1], newline="") as f:
            logged = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        first_resumed = min(logged) if logged else None
    diffs = [abs(la[i] - lb[i]) / max(1.0, abs(la[i])) for i in expected]
    grad_norms = a.get("train/grad_norm", {})
    data = {"max_rel_diff": max(diffs), "losses": [la[i] for i in expected], "first_resumed_step": first_resumed,
            "grad_norms": [grad_norms.get(i) for i in expected]}
    if first_resumed != cut:
        return "FAIL", f"the second attempt started at step {first_resumed}, not at the cut ({cut}): no resume", data
    if not all(math.isfinite(v) for v in (*la.values(), *lb.values())):
        return "FAIL", "non-finite loss", data
    # Trains: a non-zero gradient reaches the adapters at every step. (Lightning's DeepSpeed
    # strategy keeps gradients inside the engine, so the module logs no train/grad_norm there.)
    if grad_norms and (len(grad_norms) < steps or not all(v > 0 for v in grad_norms.values())):
        return "FAIL", f"train/grad_norm missing or zero at some step: {data['grad_norms']}", data
    if max(diffs) > tol:
        worst = max(expected, key=lambda i: diffs[i])
        return "FAIL", (f"resumed loss differs at step {worst}: {lb[worst]:.6g} vs {la[worst]:.6g} "
                        f"(rel {diffs[worst]:.1e} > {tol:.0e})"), data
    return "PASS", "" if grad_norms else "no train/grad_norm logged", data


def part_lightning(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    deadline = job.deadline - 10  # stop the runs ourselves, before the parent stops this worker
    signal.signal(signal.SIGTERM, _kill_launched)
    base = job.out_dir / f"part{LIGHTNING}"
    for case in cases:
        events.write(event="start", case=case["id"])
        shutil.rmtree(base / case["id"], ignore_errors=True)  # an earlier check's runs would be resumed
    # round 1: the straight run and the first half of the interrupted one; round 2: the resume
    round1 = []
    for case in cases:
        t = case["id"]
        round1.append(((t, "straight"), t, base / t / "straight", "straight", s.train_steps, base / t / "straight.log"))
        round1.append(((t, "cut"), t, base / t / "cut", "cut", s.cut_step, base / t / "cut.log"))
    first = _run_all(s, round1, deadline)
    round2 = [((c["id"], "resume"), c["id"], base / c["id"] / "cut", "cut", s.train_steps, base / c["id"] / "resume.log")
              for c in cases if first[(c["id"], "straight")][0] == 0 and first[(c["id"], "cut")][0] == 0]
    second = _run_all(s, round2, deadline)
    for case in cases:
        t = case["id"]
        label = " ".join(TRAINERS[t][1 if s.dry_run else 0])
        runs = {**{k[1]: v for k, v in first.items() if k[0] == t}, **{k[1]: v for k, v in second.items() if k[0] == t}}
        bad = [(name, rc) for name, (rc, _) in runs.items() if rc != 0]
        wall = sum(sec for _, sec in runs.values())
        if bad:
            name, rc = bad[0]
            if rc == "timeout":
                events.row(Row(LIGHTNING, label, "TIMEOUT", note=f"{name} run stopped after {runs[name][1]:.0f} s: part budget "
                                                         f"spent (log: {base / t / f'{name}.log'})"))
            else:
                events.row(Row(LIGHTNING, label, "FAIL", note=f"{name} run exit {rc}: {_log_tail(base / t / f'{name}.log')}"))
        else:
            status, msg, data = compare_resume(base / t / "straight" / "runs" / "straight",
                                               base / t / "cut" / "runs" / "cut", s.train_steps, s.cut_step,
                                               s.resume_tol)
            data["wall_s"] = wall
            measured = (f"{s.train_steps} steps, stop at {s.cut_step} + resume: max rel |dloss| "
                        f"{data.get('max_rel_diff', float('nan')):.1e}")
            losses = data.get("losses") or [float("nan")]
            note = f"loss {losses[0]:.3g} -> {losses[-1]:.3g}, 3 launches {wall:.0f} s"
            events.row(Row(LIGHTNING, label, status, measured, "uninterrupted run", "",
                           f"{msg}; {note}" if msg else note, data))
        events.write(event="done", case=t)


# ---------------------------------------------------------------------------------------------
# part STREAM: streaming inference with LMGen
# ---------------------------------------------------------------------------------------------
def real_time_fps() -> float:
    """Frames of audio per second (Mimi's frame rate)."""
    from moshi_ttt.constants import FRAME_RATE

    return FRAME_RATE


def open_adapters(model) -> int:
    """Give every zero-initialised adapter tensor (output projections, slot gates) small random
    values, as training would: at init a TTT branch adds exactly nothing, so a memory that streams
    wrongly could not change a single token. Returns how many tensors were opened."""
    opened = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
                opened += 1
    return opened


def stream(model, s: Settings, user: torch.Tensor, graphs: bool) -> tuple[float, torch.Tensor]:
    """Greedy LMGen over ``user`` frames ([N, 1, K, 1]); (frames/s over the frames after the
    warm-up, [1 + dep_q, frames out] tokens). ``graphs``: moshi's default CUDA graphs (LMGen
    graphs its text and depth steps on CUDA), else inside ``no_cuda_graph``."""
    from moshi.models.lm import LMGen
    from moshi.utils.compile import no_cuda_graph

    gen = LMGen(model, use_sampling=False)
    outputs = []
    with contextlib.nullcontext() if graphs else no_cuda_graph(), gen.streaming(1):
        for i in range(s.stream_warmup):  # graph capture happens here
            outputs.append(gen.step(user[i]))
        _sync(s.device)
        t0 = time.perf_counter()
        for i in range(s.stream_warmup, len(user)):
            outputs.append(gen.step(user[i]))
        _sync(s.device)
        dt = time.perf_counter() - t0
    tokens = torch.cat([o for o in outputs if o is not None], dim=-1)[0]
    if not ((tokens[0] >= 0).all() and (tokens[0] < model.text_card).all()
            and (tokens[1:] >= 0).all() and (tokens[1:] < model.card).all()):
        raise ValueError("LMGen produced out-of-range tokens")
    return (len(user) - s.stream_warmup) / dt, tokens.cpu()


def part_streaming(s: Settings, cases: list[dict], events: Events, job: Job) -> None:
    """Each variant built as moshi_ttt.serving builds it, its adapters opened: greedy LMGen without
    CUDA graphs, then with them (moshi's default, which the server uses): frames/s of both, and the
    graphed tokens must equal the eager ones (a streaming state that a replayed graph does not
    update would change them)."""
    for case in cases:
        name = case["id"]
        events.write(event="start", case=name)
        model = None
        try:
            cfg = compose([*s.model_overrides, *VARIANTS[name]])
            model = build_variant(cfg, s.device, serving=True)
            opened = open_adapters(model)
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            g = torch.Generator().manual_seed(0)
            user = torch.randint(0, model.card, (s.stream_warmup + s.stream_frames, 1, model.n_q - model.dep_q, 1),
                                 generator=g).to(s.device)
            _reset_peak(s.device)
            eager_fps, eager = stream(model, s, user, graphs=False)
            data = {"eager_frames_per_s": eager_fps, "frames": s.stream_frames, "opened_adapters": opened}
            try:
                graph_fps, graphed = stream(model, s, user, graphs=True)
                data["graphs_frames_per_s"] = graph_fps
                same = graphed.shape == eager.shape and bool((graphed == eager).all())
                agree = float((graphed == eager).float().mean()) if graphed.shape == eager.shape else 0.0
                data["graphs_token_agreement"] = agree
                graph_note = "" if same else f"CUDA-graphed tokens differ from eager ({100 * agree:.0f} % agree)"
            except Exception as exn:  # noqa: BLE001 - the eager numbers still stand
                graph_fps, same, graph_note = None, False, f"CUDA graphs: {_error(exn)}"
            fps = graph_fps if same and graph_fps is not None else eager_fps  # what serves correctly
            data["frames_per_s"] = fps
            real_time = real_time_fps()
            status = "FAIL" if not same else ("PASS" if fps >= real_time else "WARN")
            graphs_on = s.device.startswith("cuda")
            measured = f"eager {eager_fps:.1f}" + (f", graphs {graph_fps:.1f}" if graph_fps is not None else "")
            notes = [graph_note] if graph_note else []
            if status == "WARN":
                notes.append("below real time")
            notes.append(f"{eager.shape[-1]} frames out, peak {_fmt_gib(_peak_gib(s.device))}"
                         + ("" if graphs_on else ", no CUDA graphs on CPU"))
            events.row(Row(STREAM, name, status, measured + " frames/s", f"real time {real_time:g}",
                           f"{fps / real_time:.2f}x real time", "; ".join(notes), data))
        except Exception as exn:  # noqa: BLE001
            events.row(Row(STREAM, name, "OOM" if _is_oom(exn) else "FAIL", note=_error(exn)))
        del model
        _free_memory()
        events.write(event="done", case=name)


# ---------------------------------------------------------------------------------------------
# the parts' registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One part of the check. ``cases`` lists its cases (each a dict with a unique "id"; computed
    in the parent, also to name the SKIP rows of a part that does not run); ``run`` runs them in the
    worker process and writes one or more rows per case through ``Events`` (``start``, ``row``,
    ``done``); ``env`` adjusts the worker's environment. ``budget_s``: its own seconds on a GPU
    (--dry-run: 600), times --budget-scale; ``min_s``: it is started only while the total budget
    has that much left."""

    number: int
    name: str
    budget_s: float
    min_s: float
    cases: Callable[[Settings], list[dict]]
    run: Callable[[Settings, list[dict], Events, Job], None]
    env: Callable[[dict, Settings], None] | None = None


def _variant_cases(s: Settings) -> list[dict]:
    return [{"id": v} for v in s.variants]


def _attention_cases(s: Settings) -> list[dict]:
    T = s.attn_equal["T"]
    return ([{"id": f"equal T={T}", "kind": "equal", "prefix": False},
             {"id": f"equal T={T} + prefix slots", "kind": "equal", "prefix": True}]
            + [{"id": f"speed T={T}", "kind": "speed", "T": T} for T in s.attn_speed["lengths"]])


def _compile_flex(env: dict, s: Settings) -> None:
    """FlexAttention is compiled on CUDA, which moshi_ttt.models.attention.flex_available allows only
    without NO_TORCH_COMPILE."""
    if not s.dry_run:
        env.pop("NO_TORCH_COMPILE", None)


def _cuda_graphs(env: dict, s: Settings) -> None:
    env.pop("NO_CUDA_GRAPH", None)  # moshi's default (graphs on) is what the server runs


# In the order of their value: the runs follow this list, and so does the table.
PARTS: list[Part] = [
    Part(RUNTIME, "runtime", 40.0, 10.0, lambda s: [{"id": "moshi import + tiny LMModel forward"}], part_runtime),
    Part(TRAIN_STEP, "7B train step", 130.0, 40.0, _variant_cases, part_train_step),
    Part(TTT_LAYER, "TTT layer", 50.0, 15.0,
         lambda s: [{"id": f"{inner} T={T}", "inner": inner, "T": T} for inner in s.ttt_inners for T in s.ttt_lengths],
         part_ttt_layer),
    Part(DELTA, "delta engine", 60.0, 15.0, _delta_cases, part_delta),
    Part(ATTENTION, "flex vs sdpa", 90.0, 30.0, _attention_cases, part_attention, _compile_flex),
    Part(STREAM, "LMGen stream", 80.0, 30.0, _variant_cases, part_streaming, _cuda_graphs),
    Part(LIGHTNING, "Lightning", 100.0, 60.0, lambda s: [{"id": t} for t in s.trainers], part_lightning),
]
PART_BY_NUMBER = {p.number: p for p in PARTS}
PART_NAMES = {p.number: p.name for p in PARTS}
assert len(PART_BY_NUMBER) == len(PARTS), "two parts with one number"


def part_name(number: int) -> str:
    return PART_NAMES.get(number, "?")


# ---------------------------------------------------------------------------------------------
# orchestration: one worker process per part, budgets, crash recovery
# ---------------------------------------------------------------------------------------------
def run_worker(spec: dict) -> None:
    s = Settings(**{**spec["settings"], "budgets": {int(k): v for k, v in spec["settings"]["budgets"].items()}})
    part = PART_BY_NUMBER[spec["part"]]
    part.run(s, spec["cases"], Events(spec["events"]), Job(Path(spec["out_dir"]), spec["deadline"]))


def skip_rows(part: Part, cases: list[dict], why: str) -> list[Row]:
    return [Row(part.number, c["id"], "SKIP", note=f"not run: {why}") for c in cases]


def run_part(part: Part, s: Settings, out_dir: Path, budget: float, cut: str = "") -> list[Row]:
    """Run one part's cases in worker processes within ``budget`` seconds (``cut``: why it is less
    than the part's own). A worker that dies is restarted on the cases it had not reached; the case
    it was running is reported FAIL."""
    spent = f"part budget of {budget:.0f} s{cut} spent"
    deadline = time.monotonic() + budget
    remaining = part.cases(s)
    rows: list[Row] = []
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    env["NO_TORCH_COMPILE"] = "1"  # moshi's lazy torch.compile off, as in every make target
    if s.dry_run:
        env["OMP_NUM_THREADS"] = "1"  # tiny ops on a shared CPU: one thread is fastest
    if part.env is not None:
        part.env(env, s)
    n = part.number
    attempt = 0
    while remaining:
        left = deadline - time.monotonic()
        if left < 3:
            rows += skip_rows(part, remaining, spent)
            break
        events = Events(logs / f"part{n}-{attempt}.jsonl")
        events.path.unlink(missing_ok=True)  # a previous gpu_check's events in the same --out
        log = logs / f"part{n}-{attempt}.log"
        spec = {"part": n, "cases": remaining, "settings": asdict(s), "events": str(events.path),
                "out_dir": str(out_dir), "deadline": time.time() + left}
        spec_path = logs / f"part{n}-{attempt}.spec.json"
        spec_path.write_text(json.dumps(spec))
        timed_out = False
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec_path)], cwd=REPO, env=env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # LIGHTNING's worker takes its train.py runs down with it
                try:
                    rc = proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                timed_out = True
        seen = events.read()
        started = [e["case"] for e in seen if e["event"] == "start"]
        done = {e["case"] for e in seen if e["event"] == "done"}
        rows += [Row(**e["row"]) for e in seen if e["event"] == "row"]
        for case in started:
            if case not in done:
                if timed_out:
                    rows.append(Row(n, case, "TIMEOUT", note=f"{spent} while running"))
                else:
                    rows.append(Row(n, case, "FAIL", note=f"worker died (exit {rc}): {_log_tail(log)}"))
        remaining = [c for c in remaining if c["id"] not in started]
        if timed_out:
            rows += skip_rows(part, remaining, spent)
            break
        if rc == 0 and remaining:
            rows += [Row(n, c["id"], "FAIL", note=f"worker ended without running it: {_log_tail(log)}")
                     for c in remaining]
            break
        if rc != 0 and not started:  # died before its first case: an import or setup error
            rows += [Row(n, c["id"], "FAIL", note=f"worker failed (exit {rc}): {_log_tail(log)}") for c in remaining]
            break
        attempt += 1
    return rows


class Budget:
    """The whole check's seconds (--budget-s), shared by the parts in their order: each part gets
    its own budget cut to what is left, and is not started below its ``min_s``."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.deadline = time.monotonic() + total_s
        self.log: dict[int, dict] = {}  # part number -> seconds allotted and used, or why it was skipped

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, part: Part, s: Settings, out_dir: Path) -> list[Row]:
        left, own = self.left(), s.budgets[part.number]
        if left < part.min_s:
            why = (f"the check's budget of {self.total_s:.0f} s (--budget-s) is spent: {max(left, 0):.0f} s left, "
                   f"this part needs at least {part.min_s:.0f} s")
            self.log[part.number] = {"part": part.number, "name": part.name, "skipped": why}
            print(f"gpu_check: part {part.number} ({part.name}) not run: {why}", file=sys.stderr, flush=True)
            return skip_rows(part, part.cases(s), why)
        budget = min(own, left)
        cut = f" (of its {own:.0f} s: what --budget-s {self.total_s:.0f} left)" if budget < own else ""
        started = time.monotonic()
        try:
            rows = run_part(part, s, out_dir, budget, cut)
        except Exception as exn:  # noqa: BLE001 - the orchestration of one part must not stop the others
            rows = [Row(part.number, "(part)", "FAIL", note=_error(exn))]
            traceback.print_exc()
        used = time.monotonic() - started
        self.log[part.number] = {"part": part.number, "name": part.name, "allotted_s": budget, "used_s": used}
        print(f"gpu_check: part {part.number} ({part.name}) took {used:.0f} s of {budget:.0f}; "
              f"{max(self.left(), 0):.0f} s of the check's {self.total_s:.0f} left", file=sys.stderr, flush=True)
        return rows


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
COLUMNS = ("part", "case", "status", "measured", "reference", "ratio", "note")


def _cells(row: Row) -> list[str]:
    return [f"{row.part} {part_name(row.part)}", row.case, row.status, row.measured, row.reference, row.ratio,
            row.note]


def render_text(rows: list[Row], header: str) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = [header]
    for i, c in enumerate(cells):
        lines.append("  ".join([v.ljust(w) for v, w in zip(c[:-1], widths)] + [c[-1]]).rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 4))
    return "\n".join(lines) + "\n"


def render_markdown(rows: list[Row], header: str) -> str:
    def esc(v: str) -> str:
        return v.replace("|", "\\|")

    lines = [f"# gpu-check\n\n{header}\n", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(esc(v) for v in _cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def describe_machine(s: Settings) -> str:
    if s.dry_run:
        return f"DRY RUN on CPU at tiny sizes (torch {torch.__version__}): code paths only, numbers mean nothing"
    props = torch.cuda.get_device_properties(0)
    peak = s.peak_flops
    return (f"{props.name}, {_gib(props.total_memory):.0f} GiB, bf16 peak "
            f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (set MOSHI_TTT_PEAK_FLOPS)'}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    parser.add_argument("--parts", type=int, nargs="+", default=[p.number for p in PARTS], choices=list(PART_NAMES),
                        metavar="N", help="which parts, of " + ", ".join(f"{p.number} {p.name}" for p in PARTS)
                        + f" (default all; part {RUNTIME} always runs first; the runs follow this order)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole check: parts run in order of value while it lasts, the rest "
                             "are SKIP rows (default %(default)g)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"of {list(VARIANTS)} (parts {TRAIN_STEP}, {STREAM}; default all)")
    parser.add_argument("--trainers", nargs="+", default=None, choices=list(TRAINERS), metavar="TRAINER",
                        help=f"of {list(TRAINERS)} (part {LIGHTNING}; default all)")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help=f"Hydra overrides for the model of parts {TRAIN_STEP} and {STREAM} "
                             "(e.g. ttt.ttt_layer.num_heads=8)")
    parser.add_argument("--out", default="outputs/gpu_check", help="directory for gpu_check.json/.md and logs")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's own time budget")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: moshi_ttt.training.module.peak_flops by device name, "
                             "or MOSHI_TTT_PEAK_FLOPS)")
    parser.add_argument("--resume-tol", type=float, default=None,
                        help=f"part {LIGHTNING}: largest relative per-step loss difference after a resume "
                             "(default 1e-6 on CPU, 2e-3 on CUDA)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="parts run at once (--dry-run only: on a GPU they would disturb each other's numbers)")
    parser.add_argument("--install-s", type=float, default=None,
                        help="seconds the install before this took (bench/gpu_check_device.sh): shown in the header")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        run_worker(json.loads(Path(args.worker).read_text()))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); this check needs one CUDA GPU. "
              "`python bench/gpu_check.py --dry-run` runs the same code on the CPU at tiny sizes.", file=sys.stderr)
        return 2
    if args.jobs < 1 or (args.jobs > 1 and not args.dry_run):
        parser.error("--jobs must be 1 on a GPU (parts running at once would disturb each other's numbers)")
    budget = Budget(args.budget_s)  # from here on, everything counts
    s = make_settings(args)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if p.number == RUNTIME or p.number in args.parts]
    header = describe_machine(s)
    print(f"gpu_check: {header}; budget {args.budget_s:.0f} s; parts in order "
          f"{[p.number for p in parts]}, their own budgets (s) { {p.number: round(s.budgets[p.number]) for p in parts} }; "
          f"logs in {out_dir / 'logs'}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    finished: dict[int, list[Row]] = {}
    lock = threading.Lock()

    def report(final: bool) -> tuple[list[Row], str, dict]:
        """gpu_check.json and .md with the parts finished so far (after each part, so that a call cut
        short still brings back the table up to there)."""
        rows = [row for p in parts for row in finished.get(p.number, [])]
        wall = time.perf_counter() - t0
        head = (f"{header}; budget {args.budget_s:.0f} s, took {wall:.0f} s"
                + (f" (+ install {args.install_s:.0f} s)" if args.install_s is not None else "")
                + ("" if final else f"; PARTIAL: parts {[p.number for p in parts if p.number not in finished]} to come"))
        summary = {s_: sum(r.status == s_ for r in rows) for s_ in STATUSES}
        (out_dir / "gpu_check.json").write_text(json.dumps(
            {"machine": head, "dry_run": s.dry_run, "final": final, "wall_s": wall, "budget_s": args.budget_s,
             "install_s": args.install_s, "parts": [budget.log[p.number] for p in parts if p.number in budget.log],
             "settings": asdict(s), "summary": summary, "rows": [asdict(r) for r in rows]}, indent=2))
        (out_dir / "gpu_check.md").write_text(render_markdown(rows, head))
        return rows, head, summary

    def run_one(part: Part) -> None:
        part_rows = budget.run(part, s, out_dir)
        with lock:
            finished[part.number] = part_rows
            report(final=False)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # parts one at a time on a GPU
        list(pool.map(run_one, parts))
    rows, header, summary = report(final=True)
    print(render_text(rows, header), end="")
    print("summary: " + ", ".join(f"{n} {k}" for k, n in summary.items() if n))
    return 1 if any(r.status in FAILING for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
