"""The run's configuration: typed schema (Hydra ConfigStore), validation, errors, explanations."""

from moshi_ttt.config.errors import ConfigError
from moshi_ttt.config.store import register

register()

__all__ = ["ConfigError", "register"]
