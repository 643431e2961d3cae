"""Registers the schema with Hydra's ConfigStore and the ``moshi_ttt.run_steps`` resolver.

``conf/train.yaml`` lists ``train_schema`` first in its defaults, so anything that composes it
(train.py, ``hydra.compose`` in tests, plan, memory_proof) needs this to have run: importing
``moshi_ttt`` runs it.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from moshi_ttt.config.schema import TrainConfig

SCHEMA_NAME = "train_schema"


def run_steps(default: int, *, _root_) -> int:
    """The run's length: the curriculum's total steps when it has stages, else ``default``.

    ``trainer.max_steps`` defaults to this, so the composed config says how long the run is.
    """
    stages = OmegaConf.select(_root_, "curriculum.stages", default=None) or []
    return sum(int(s.steps) for s in stages) if len(stages) else int(default)


def config_help() -> str:
    """Every key's documentation, for ``python train.py --help`` (``$`` escaped for its template)."""
    from moshi_ttt.config.explain import (
        all_keys,
        component_keys,
        renamed_list,
        render,
        strategy_heading,
        strategy_keys,
    )

    text = "\n".join([render(all_keys()), "", strategy_heading(), render(strategy_keys()), "",
                      "Named components (callbacks.NAME, logger.NAME):", render(component_keys()), "", renamed_list()])
    return text.replace("$", "$$")


def register() -> None:
    """Idempotent: safe to call from every entry point."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    for name, fn in (("moshi_ttt.run_steps", run_steps), ("moshi_ttt.config_help", config_help)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
