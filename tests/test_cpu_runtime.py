"""The CPU runtime settings: freed large blocks are reused instead of being page-faulted again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from moshi_ttt.training.cpu_runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(16 * 2**20); del x  # 64 MiB, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # a training loop's activation, allocated and freed every step
    x = torch.ones(16 * 2**20); small = torch.ones(1000); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_large_blocks_are_reused_without_page_faults():
    faults = {}
    for mode in ("glibc", "keep"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(out.stdout.strip().splitlines()[-1])
    block = 64 * 2**20 // 4096  # pages of one allocation
    assert faults["glibc"] > 6 * block, faults  # a fresh mmap every step: every page faulted again
    assert faults["keep"] < 4 * block, faults  # freed heap blocks are reused
