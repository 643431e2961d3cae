"""Shared fixtures: tiny models, tiny data and Hydra configs, all on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# This checkout's sources, for the tests and the subprocesses they start (train.py, DDP ranks),
# whatever checkout the shared virtual environment's editable install points to.
sys.path.insert(0, str(REPO / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)

torch.set_num_threads(min(2, os.cpu_count() or 1))
torch.set_flush_denormal(True)  # as train() does: subnormals are ~100x slower on x86


@pytest.fixture(scope="session")
def tiny_lm_kwargs() -> dict:
    """The tiny Moshi of conf/model/tiny.yaml, so tests and the demo build the same model."""
    return yaml.safe_load((CONF_DIR / "model" / "tiny.yaml").read_text())["lm_kwargs"]


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose conf/train.yaml with overrides, writing everything under tmp_path."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_root={tmp_path}", *overrides])

    return _compose


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny codec's convolutions run fastest on one thread of a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
