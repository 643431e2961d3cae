"""moshi-ttt: test-time-training memory for Moshi, and the framework that trains it."""

__version__ = "0.1.0"
