"""Keeps ``python -m moshi_ttt.diagnose`` (the documented command) working: its code is ``moshi_ttt.diagnostics.cli``."""

import sys

from moshi_ttt.diagnostics.cli import main

if __name__ == "__main__":
    sys.exit(main())
