"""The preemption signal, caught from the first line of the process.

SLURM's early-warning signal (``--signal=USR1@N``) can arrive while Python is still importing
torch or building the model; its default action would kill the job with nothing saved, and a
job killed at its time limit is never requeued. ``arm()`` (called first thing by train.py,
before any heavy import) only records that the signal came; the PreemptionCallback takes it
over when training starts and acts on a recorded signal at the first step boundary.
"""

from __future__ import annotations

import signal

_received: set[int] = set()


def _record(signum, frame) -> None:
    _received.add(signum)


def arm(signal_name: str = "SIGUSR1") -> None:
    """Record ``signal_name`` instead of dying of it, until a callback installs its handler."""
    signum = getattr(signal, signal_name)
    if signal.getsignal(signum) in (signal.SIG_DFL, None):
        signal.signal(signum, _record)


def take(signum: int) -> bool:
    """Whether ``signum`` arrived before its real handler was installed (and forget it)."""
    if signum in _received:
        _received.discard(signum)
        return True
    return False
