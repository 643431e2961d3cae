"""``python -m moshi_ttt.export CKPT OUT_DIR``: a training checkpoint -> TTT weights + config.

CKPT is a Lightning checkpoint file or a DeepSpeed (ZeRO) checkpoint directory. OUT_DIR gets
``ttt_weights.safetensors`` (only what was trained: TTT layers, LoRA when used) and
``config.json`` (the base model's source and the ``ttt``/``lora`` settings), from which
``moshi_ttt.models.load_exported`` rebuilds the full model for LMGen.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

logger = logging.getLogger("moshi_ttt.export")

WEIGHTS_NAME = "ttt_weights.safetensors"
CONFIG_NAME = "config.json"


def _find_run_config(ckpt: Path) -> Path:
    for parent in [ckpt.parent, *ckpt.parents]:
        candidate = parent / "config.yaml"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{ckpt}: no config.yaml in its run directory; pass --config")


def trained_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Trainable weights (keys relative to the LMModel) from a Lightning file or a ZeRO directory."""
    if ckpt.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else None
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag, exclude_frozen_parameters=True)
    else:
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
        if "state_dict" not in raw:
            raise ValueError(f"{ckpt}: not a Lightning checkpoint (no state_dict)")
        state = raw["state_dict"]
    out = {k.removeprefix("model."): v.detach().float().contiguous() for k, v in state.items()}
    if not out:
        raise ValueError(f"{ckpt}: holds no trained weights")
    return out


def export(ckpt: str | Path, out_dir: str | Path, config: str | Path | None = None) -> Path:
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    run_cfg = yaml.safe_load(Path(config or _find_run_config(ckpt)).read_text())
    state = trained_state_dict(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / WEIGHTS_NAME))
    meta = {"format": "moshi-ttt-export/1", "model": run_cfg["model"], "ttt": run_cfg.get("ttt", {"variant": "none"}),
            "source_checkpoint": str(ckpt), "num_tensors": len(state),
            "num_parameters": int(sum(v.numel() for v in state.values()))}
    (out_dir / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    logger.info("exported %d tensors (%s parameters) to %s", len(state), f"{meta['num_parameters']:,}", out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("out_dir")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: found beside the checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(args.ckpt, args.out_dir, args.config)
    except (FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
