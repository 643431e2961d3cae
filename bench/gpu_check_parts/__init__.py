"""The parts of bench/gpu_check.py (its entry point, registry and orchestration): one module per part, ``common`` for what they share, ``report`` for the table."""
