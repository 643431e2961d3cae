"""Keeps ``python -m moshi_ttt.infer`` (the documented command) working: its code is ``moshi_ttt.serving.infer_cli``."""

import sys

from moshi_ttt.serving.infer_cli import main

if __name__ == "__main__":
    sys.exit(main())
