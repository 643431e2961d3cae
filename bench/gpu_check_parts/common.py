"""What the parts share: the part numbers, the settings, the rows and a worker's event log, small
device helpers, and the model of parts TRAIN_STEP and STREAM. The registry (``PARTS``) stays in
bench/gpu_check.py, which fills ``PART_NAMES`` from it, so that the parts need not import it."""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# Part numbers: the table's first column and --parts. The order of the runs is PARTS' order (by
# value, in bench/gpu_check.py); a new part takes the next free number.
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
PART_NAMES: dict[int, str] = {}  # part number -> name: filled from PARTS by bench/gpu_check.py


def part_name(number: int) -> str:
    return PART_NAMES.get(number, "?")


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


def gib(n: float) -> float:
    return n / 2**30


def error(exn: BaseException) -> str:
    text = f"{type(exn).__name__}: {exn}".replace("\n", " ")
    return text[:300]


def is_oom(exn: BaseException) -> bool:
    return isinstance(exn, torch.OutOfMemoryError) or "out of memory" in str(exn).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def fmt_gib(value: float | None) -> str:
    if value is None:
        return "n/a (CPU)"
    return f"{value:.2f} GiB" if value >= 0.1 else f"{value * 1024:.2f} MiB"


def within(ratio: float, tol: float = PLANNER_TOLERANCE) -> bool:
    return abs(ratio - 1.0) <= tol


def log_tail(path: Path, n: int = 3) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return " | ".join((errors or lines)[-n:])[:300]


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
