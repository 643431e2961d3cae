"""moshi-ttt: test-time-training memory for Moshi, and the framework that trains it."""

__version__ = "0.1.0"

# The config schema and resolvers must be registered with Hydra before conf/train.yaml is composed.
from moshi_ttt import config as _config  # noqa: E402, F401
