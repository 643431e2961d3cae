"""``python -m moshi_ttt.plan``."""

import sys

from moshi_ttt.plan.cli import main

sys.exit(main())
