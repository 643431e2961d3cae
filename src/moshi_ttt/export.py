"""``python -m moshi_ttt.export CKPT OUT_DIR``: a training checkpoint -> a directory moshi's users recognise.

CKPT is a Lightning checkpoint file, a DeepSpeed (ZeRO) checkpoint directory or a run
directory (its ``checkpoints/last.ckpt``). OUT_DIR gets:

- ``config.json``: moshi's config layout (the base LM's constructor settings at the top level,
  ``lora``/``lora_rank``/``lora_scaling``/``lora_name`` as moshi-finetune writes them,
  ``mimi_name``/``tokenizer_name`` when the codec files are included) plus a ``moshi_ttt``
  section: where the frozen base comes from, the TTT settings, the weights file names;
- ``ttt.safetensors``: the TTT layers' trained weights;
- ``lora.safetensors`` when LoRA trained, keyed by the plain moshi module names (as moshi's
  ``get_lora_moshi`` loads them);
- the model's Mimi (``mimi.safetensors`` + ``mimi_config.json``) and tokenizer
  (``tokenizer.model``) when they are local files (a hub base's are recorded by repo id).

The model config comes from the checkpoint itself (``serving.checkpoint``). ``serve``,
``infer``, ``eval`` and ``diagnose`` take OUT_DIR, or a hub repo id it was uploaded to.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from moshi_ttt.config.groups import ttt_dict
from moshi_ttt.models.export_format import (
    NON_LM_KEYS,
    TOKENIZER_NAME,
    config_json,
    load_export_weights,
    read_export,
    write_config,
    write_weights,
)
from moshi_ttt.serving.checkpoint import last_checkpoint, load_raw, run_config, trained_state_dict

logger = logging.getLogger("moshi_ttt.export")

__all__ = ["export", "load_export_weights", "main", "read_export"]  # the last two: for older callers


def _base_lm_config(model_cfg: dict) -> tuple[dict, bool]:
    """(the base LM's constructor settings, complete?) for config.json's top level."""
    overrides = dict(model_cfg.get("lm_kwargs") or {})
    source = model_cfg.get("source", "tiny")
    if source == "tiny":
        return overrides, True
    raw = None
    if source == "dir" and model_cfg.get("path"):
        path = Path(model_cfg["path"]).expanduser() / "config.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
    elif source == "hf" and model_cfg.get("repo"):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            raw = json.loads(Path(hf_hub_download(model_cfg["repo"], "config.json",
                                                  revision=model_cfg.get("revision"))).read_text())
        except EntryNotFoundError:
            raw = {}  # a legacy repo: moshi assumes Moshi 7B's built-in config, as below
        except Exception as exn:  # noqa: BLE001 - offline: say so, keep going
            logger.warning("model.repo=%s: could not read its config.json (%s); config.json's top level holds only "
                           "the overrides of model.lm_kwargs", model_cfg["repo"], exn)
            return overrides, False
    if raw is None:
        return overrides, False
    if not raw:
        from moshi.models import loaders

        raw = dict(loaders._lm_kwargs)
    return {**{k: v for k, v in raw.items() if k not in NON_LM_KEYS}, **overrides}, True


def _copy_codec(run_cfg: dict, out_dir: Path, mimi: str | None, tokenizer: str | None) -> tuple[dict, dict]:
    """(config.json entries, moshi_ttt.codec) for the model's Mimi and tokenizer."""
    from moshi_ttt.data.alignment import locate_text_tokenizer
    from moshi_ttt.data.codec import (
        MIMI_CONFIG,
        MIMI_WEIGHTS,
        TINY_MIMI_CONFIG,
        build_tiny_mimi,
        locate_mimi,
        save_mimi,
    )
    from moshi_ttt.serving.codec import codec_sources

    try:
        sources = codec_sources(run_cfg, mimi, tokenizer)
    except ValueError as exn:
        logger.warning("no Mimi/tokenizer in the export (%s); serve and infer will need --mimi and --tokenizer", exn)
        return {}, {}
    entries, codec = {}, {}
    if sources.mimi == "tiny":
        save_mimi(build_tiny_mimi(TINY_MIMI_CONFIG), TINY_MIMI_CONFIG, out_dir)
        entries.update(mimi_name=MIMI_WEIGHTS, mimi_config_name=MIMI_CONFIG)
    elif Path(sources.mimi).expanduser().exists():
        weights, mimi_config = locate_mimi(sources.mimi)
        shutil.copyfile(weights, out_dir / MIMI_WEIGHTS)
        entries["mimi_name"] = MIMI_WEIGHTS
        if mimi_config is not None:
            (out_dir / MIMI_CONFIG).write_text(json.dumps(mimi_config, indent=2))
            entries["mimi_config_name"] = MIMI_CONFIG
    else:
        codec["mimi"] = sources.mimi
    if Path(sources.tokenizer).expanduser().exists():
        shutil.copyfile(locate_text_tokenizer(sources.tokenizer), out_dir / TOKENIZER_NAME)
        entries["tokenizer_name"] = TOKENIZER_NAME
    else:
        codec["tokenizer"] = sources.tokenizer
    if codec:  # what is not in the directory is named by where it comes from
        codec.setdefault("mimi", ".")
        codec.setdefault("tokenizer", ".")
    return entries, codec


def export(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None, mimi: str | None = None,
           tokenizer: str | None = None) -> Path:
    """Write the export directory of ``ckpt`` (a checkpoint or a run directory) to ``out_dir``."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    if ckpt.is_dir() and ((ckpt / "checkpoints").is_dir() or (ckpt / "config.yaml").exists()):
        ckpt = last_checkpoint(ckpt)
    raw = load_raw(ckpt)
    run_cfg = run_config(ckpt, raw, fallback=config)
    state = trained_state_dict(ckpt, None if ckpt.is_dir() else raw)
    model_cfg = dict(run_cfg["model"])
    ttt_cfg = ttt_dict(run_cfg.get("ttt"), f"{ckpt}: ttt")  # under the current key names
    if model_cfg.get("train_base"):
        raise ValueError(f"{ckpt}: model.train_base=true trained the whole base; an adapter export would drop it")
    out_dir.mkdir(parents=True, exist_ok=True)
    ttt, lora = write_weights(out_dir, state)
    lm_config, complete = _base_lm_config(model_cfg)
    codec_entries, codec = _copy_codec(run_cfg, out_dir, mimi, tokenizer)
    meta = config_json(state, model_cfg, ttt_cfg, lm_config, complete, codec_entries, codec, str(ckpt))
    write_config(out_dir, meta)
    logger.info("exported %d tensors (%s parameters: %d TTT, %d LoRA tensors) to %s", len(state),
                f"{meta['moshi_ttt']['num_parameters']:,}", len(ttt), len(lora), out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_ttt.export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("ckpt", help="Lightning .ckpt file, DeepSpeed checkpoint directory or run directory")
    parser.add_argument("out_dir")
    parser.add_argument("--config", default=None,
                        help="a run's config.yaml, only for old checkpoints that do not carry their config")
    parser.add_argument("--mimi", default=None, help="Mimi to include (default: the one the run trained with)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to include (default: the run's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.ckpt, args.out_dir, args.config, args.mimi, args.tokenizer)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
