"""What a training checkpoint says about itself: its trained weights and the run config it was made with.

Every checkpoint carries the whole resolved run config as a plain dict under
:data:`CONFIG_KEY` (written at save time), so a checkpoint rebuilds the exact model it was
trained as, whatever later attempts wrote to the run directory's ``config.yaml``. Older
checkpoints without the key fall back to that ``config.yaml``, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

logger = logging.getLogger(__name__)

CONFIG_KEY = "moshi_ttt_config"


def _zero_client_state(ckpt: Path) -> dict:
    """The non-tensor part Lightning stores in a DeepSpeed checkpoint directory."""
    tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else "checkpoint"
    files = sorted((ckpt / tag).glob("*model_states.pt")) if (ckpt / tag).is_dir() else []
    if not files:
        raise ValueError(f"{ckpt}: a DeepSpeed checkpoint directory without {tag}/*model_states.pt")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def load_raw(ckpt: str | Path) -> dict:
    """The checkpoint as saved (a Lightning file, or a ZeRO directory's client state)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    if ckpt.is_dir():
        return _zero_client_state(ckpt)
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as exn:  # noqa: BLE001 - truncated files and foreign formats raise many types
        raise ValueError(f"{ckpt}: not a readable checkpoint ({type(exn).__name__}: {exn})") from exn
    if not isinstance(raw, dict):
        raise ValueError(f"{ckpt}: not a Lightning checkpoint (a {type(raw).__name__})")
    return raw


def find_run_config(ckpt: Path) -> Path | None:
    """The ``config.yaml`` of the run directory that holds ``ckpt`` (None when there is none)."""
    for parent in [ckpt.parent, *ckpt.parents]:
        candidate = parent / "config.yaml"
        if candidate.exists():
            return candidate
    return None


def run_config(ckpt: str | Path, raw: dict | None = None, fallback: str | Path | None = None) -> dict:
    """The resolved run config a checkpoint was trained with (``model``, ``ttt``, ``data``...).

    Read from the checkpoint itself; for checkpoints written before it carried its config,
    from ``fallback`` or the run directory's ``config.yaml``, with a warning (that file is
    rewritten by every attempt of the run and may not describe this checkpoint)."""
    ckpt = Path(ckpt)
    raw = load_raw(ckpt) if raw is None else raw
    cfg = raw.get(CONFIG_KEY)
    if cfg is not None:
        if not isinstance(cfg, dict) or "model" not in cfg:
            raise ValueError(f"{ckpt}: checkpoint[{CONFIG_KEY!r}] holds no 'model' section")
        return _current_names(cfg, ckpt)
    path = Path(fallback) if fallback is not None else find_run_config(ckpt)
    if path is None or not path.exists():
        raise FileNotFoundError(f"{ckpt}: the checkpoint has no {CONFIG_KEY!r} (written before checkpoints "
                                "carried their config) and no config.yaml was found in its run directory")
    logger.warning("%s: no %r in the checkpoint (an older one); using %s, which the latest attempt of the run "
                   "wrote and may differ from the settings this checkpoint was trained with", ckpt, CONFIG_KEY, path)
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"{path}: no 'model' section (not a run's config.yaml)")
    return _current_names(cfg, path)


def _current_names(cfg: dict, source: Path) -> dict:
    """The run config with its ``ttt`` section under the current key names (a config stored before a
    rename is moved with a warning that names the new key) and the schema's defaults filled in."""
    from moshi_ttt.config.groups import ttt_dict

    return {**cfg, "ttt": ttt_dict(cfg.get("ttt"), f"{source}: ttt")}


def trained_state_dict(ckpt: str | Path, raw: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable weights (keys relative to the LMModel) from a Lightning file or a ZeRO directory."""
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else None
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag, exclude_frozen_parameters=True)
    else:
        raw = load_raw(ckpt) if raw is None else raw
        if "state_dict" not in raw:
            raise ValueError(f"{ckpt}: not a Lightning checkpoint (no state_dict)")
        state = raw["state_dict"]
    out = {k.removeprefix("model."): v.detach().float().contiguous() for k, v in state.items()}
    if not out:
        raise ValueError(f"{ckpt}: holds no trained weights")
    return out


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/last.ckpt`` (a file or a ZeRO directory), or an error naming the run."""
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        raise FileNotFoundError(f"run {run_dir}: no checkpoints/last.ckpt (has it saved a checkpoint yet?)")
    return ckpt
