"""Logger factories whose behaviour depends on the environment, not only on the config."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(project: str, run_name: str, save_dir: str, entity: str | None = None,
                 tags: list[str] | None = None, mode: str | None = None) -> WandbLogger:
    """W&B logger whose run id is the run name, so a resubmitted job continues the same run.

    Offline unless credentials exist; WANDB_MODE (or ``mode``) wins over that guess.
    """
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, name=run_name, id=run_name, resume="allow", save_dir=save_dir,
                       entity=entity, tags=list(tags or []), mode=mode)
