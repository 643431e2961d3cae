"""``MODEL`` on the command line of serve, infer, eval and diagnose: one way to name a trained model.

MODEL is any of:

- an export directory (``python -m moshi_ttt.export``): ``config.json`` + TTT/LoRA safetensors;
- a hub repo id (``org/name``) holding such a directory, fetched with huggingface_hub;
- a run directory (``outputs/runs/NAME``): its ``checkpoints/last.ckpt``;
- a checkpoint: a Lightning ``.ckpt`` file or a DeepSpeed checkpoint directory.

Checkpoints rebuild the model from the run config they carry (``serving.checkpoint``). The
result is the full LMModel (frozen base + LoRA + TTT, eval mode, no gradients) together with
the Mimi and tokenizer the model was trained with (``serving.codec``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from moshi_ttt.serving.checkpoint import last_checkpoint, load_raw, run_config, trained_state_dict
from moshi_ttt.serving.codec import CodecSources, codec_sources

logger = logging.getLogger(__name__)

KINDS = ("export", "hub", "run", "checkpoint")


@dataclass
class ModelRef:
    """A resolved MODEL argument: what it is and where its files are."""

    kind: str
    path: str
    spec: str

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


def _is_zero_dir(path: Path) -> bool:
    return (path / "latest").exists() or any(path.glob("*/*model_states.pt"))


def resolve(spec: str) -> ModelRef:
    """Which kind of MODEL ``spec`` is; an error naming it when it is none of them (no compute)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return ModelRef("checkpoint", str(path), spec)
    if path.is_dir():
        from moshi_ttt.models.export_format import CONFIG_NAME

        if (path / CONFIG_NAME).exists():
            return ModelRef("export", str(path), spec)
        if (path / "checkpoints").is_dir() or (path / "config.yaml").exists():
            return ModelRef("run", str(path), spec)
        if _is_zero_dir(path):
            return ModelRef("checkpoint", str(path), spec)
        raise FileNotFoundError(f"MODEL {spec}: a directory that is neither an export (no config.json), a run "
                                "(no checkpoints/ or config.yaml) nor a DeepSpeed checkpoint")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/")):
        return ModelRef("hub", spec, spec)
    raise FileNotFoundError(f"MODEL {spec} does not exist (expected an export directory, a run directory, a "
                            "checkpoint or a hub repo id org/name)")


def fetch_hub_export(repo: str, revision: str | None = None) -> Path:
    """A local copy of an export directory published on the hub (the files export writes only)."""
    from huggingface_hub import snapshot_download

    from moshi_ttt.models.export_format import FILE_PATTERNS

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=FILE_PATTERNS))
    except Exception as exn:  # noqa: BLE001 - hub errors come in many types; the user needs the repo
        raise FileNotFoundError(f"MODEL {repo}: no such local path, and could not fetch it from the hub ({type(exn).__name__}: {exn}); "
                                "offline? download the export directory and pass its path") from exn


@dataclass
class Source:
    """Everything needed to rebuild a model: its config, trained weights and codec sources."""

    ref: ModelRef
    model_cfg: dict
    ttt_cfg: dict
    codec: CodecSources | None
    checkpoint: Path | None = None  # run/checkpoint kinds
    export_dir: Path | None = None  # export/hub kinds
    info: dict = field(default_factory=dict)


def _codec_or_none(run_cfg: dict, mimi, tokenizer) -> CodecSources | None:
    try:
        return codec_sources(run_cfg, mimi, tokenizer)
    except ValueError:
        return None


def read_source(ref: ModelRef, mimi: str | None = None, tokenizer: str | None = None,
                revision: str | None = None) -> Source:
    """The config of a MODEL (read from the checkpoint or export itself), not yet built."""
    if ref.kind in ("export", "hub"):
        from moshi_ttt.models.export_format import read_export

        directory = Path(ref.path) if ref.kind == "export" else fetch_hub_export(ref.path, revision)
        meta = read_export(directory)
        codec = None
        if mimi and tokenizer:
            codec = CodecSources(mimi, tokenizer, "the command line")
        elif meta.get("codec"):
            c = meta["codec"]
            codec = CodecSources(mimi or c["mimi"], tokenizer or c["tokenizer"], f"{directory}/config.json")
        else:
            codec = _codec_or_none({"model": meta["model"]}, mimi, tokenizer)
        return Source(ref, meta["model"], meta["ttt"], codec, export_dir=directory, info=meta)
    ckpt = last_checkpoint(ref.path) if ref.kind == "run" else Path(ref.path)
    raw = load_raw(ckpt)
    cfg = run_config(ckpt, raw)
    info = {"run_config": cfg, "_raw": None if ckpt.is_dir() else raw}  # the weights, read once
    return Source(ref, dict(cfg["model"]), dict(cfg.get("ttt") or {"variant": "none"}),
                  _codec_or_none(cfg, mimi, tokenizer), checkpoint=ckpt, info=info)


def build_lm(src: Source, base_override: dict | None = None, device: str | None = None,
             dtype: str | None = None):
    """The full LMModel of a source in eval mode, every parameter frozen."""
    from moshi_ttt.models import build_model
    from moshi_ttt.models.build import load_trained_weights

    if src.export_dir is not None:
        from moshi_ttt.models import load_exported

        return load_exported(src.export_dir, base=base_override, device=device, dtype=dtype)
    model_cfg = {**src.model_cfg, **(base_override or {}), "gradient_checkpointing": False, "train_base": False}
    if device is not None:
        model_cfg["device"] = device
    if dtype is not None:
        model_cfg["dtype"] = dtype
    trained_base = bool(src.model_cfg.get("train_base"))
    model = build_model(model_cfg, src.ttt_cfg)
    state = trained_state_dict(src.checkpoint, src.info.pop("_raw", None))
    if trained_base:  # the base itself trained (memory proof): every weight comes from the checkpoint
        model.load_state_dict(state, strict=True)
    else:
        load_trained_weights(model, state, src.checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclass
class Loaded:
    lm: object
    mimi: object
    tokenizer: object
    source: Source


def load(spec: str, device: str = "cpu", dtype: str | None = None, mimi: str | None = None,
         tokenizer: str | None = None, base_override: dict | None = None, revision: str | None = None) -> Loaded:
    """LM + Mimi + tokenizer of MODEL ``spec`` (an error names what is missing before the LM is built)."""
    from moshi_ttt.serving.codec import load_codec

    src = read_source(resolve(spec), mimi, tokenizer, revision)
    if src.codec is None:
        raise ValueError(f"MODEL {spec}: cannot tell which Mimi and tokenizer it was trained with; pass --mimi "
                         "and --tokenizer")
    mimi_model, sp = load_codec(src.codec, device)
    lm = build_lm(src, base_override, device, dtype)
    if sp.get_piece_size() > lm.text_card:
        raise ValueError(f"tokenizer {src.codec.tokenizer}: {sp.get_piece_size()} pieces, the model's text_card "
                         f"is {lm.text_card} (not the tokenizer it was trained with?)")
    if mimi_model.quantizer.cardinality != lm.card:
        raise ValueError(f"mimi {src.codec.mimi}: {mimi_model.quantizer.cardinality} bins per codebook, the "
                         f"model's card is {lm.card} (not the codec it was trained with?)")
    logger.info("loaded %s (ttt=%s) with mimi=%s tokenizer=%s (%s)", src.ref.describe(),
                src.ttt_cfg.get("variant", "none"), src.codec.mimi, src.codec.tokenizer, src.codec.origin)
    return Loaded(lm, mimi_model, sp, src)


def generation_config(src: Source) -> dict:
    """The model's recommended LMGen settings (moshi's ``lm_gen_config``), when it has any."""
    meta = src.info if src.export_dir is not None else {}
    return dict(meta.get("lm_gen_config") or {})



def tokenizer_vocab_hook(lm, tokenizer):
    """An LMGen ``on_text_logits_hook`` that keeps the sampled text inside the tokenizer's pieces.

    A model whose ``text_card`` exceeds its tokenizer (the demo: 320 ids for ~290 pieces) could
    otherwise sample an id the tokenizer cannot turn into text; None when they are the same size."""
    pieces = tokenizer.get_piece_size()
    if pieces >= lm.text_card:
        return None

    def hook(text_logits):
        text_logits[..., pieces:] = float("-inf")

    return hook


def lm_gen_kwargs(loaded: Loaded, sampling: dict) -> dict:
    """LMGen settings for a loaded model: the model's recommended ones, then the user's, then the vocabulary hook."""
    kwargs = {**generation_config(loaded.source), **sampling}
    hook = tokenizer_vocab_hook(loaded.lm, loaded.tokenizer)
    if hook is not None:
        kwargs["on_text_logits_hook"] = hook
    return kwargs
