"""Process-wide settings that make long CPU training steps cost what their arithmetic costs.

- Subnormal floats take a ~100x slower path on x86; decaying fast-weight updates produce them,
  so they are flushed to zero.
- glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap and
  unmaps it on free, so each large activation of a long sequence is page-faulted and zeroed by
  the kernel again at every use: a 30-minute (22 500-frame) step spent ~30 % of its time there
  (bench/long_sequence.py). Keeping freed memory in the heap (no mmap for large blocks, no trim)
  lets the allocator reuse it, as CUDA's caching allocator does on GPU. Memory is not returned
  to the OS while the process runs; the heap can fragment a little (small blocks landing in freed
  large ones), so it is applied to CPU training only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """glibc ``mallopt``: no mmap for large blocks, never trim the heap. False where not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = ok
    if not ok:
        logger.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return ok


def tune_cpu_runtime(cpu_training: bool) -> None:
    """Flush subnormals always; keep freed memory only when the activations live on the CPU (on
    GPU the host allocations are small and returning memory to the OS is the better default)."""
    torch.set_flush_denormal(True)
    if cpu_training:
        keep_freed_memory()
