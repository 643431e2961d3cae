"""Keeps ``python -m moshi_ttt.serve`` (the documented command) working: its code is ``moshi_ttt.serving.serve_cli``."""

import sys

from moshi_ttt.serving.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
