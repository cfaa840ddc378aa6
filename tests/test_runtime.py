"""moekit.runtime: the allocator setting keeps large freed buffers in the process (glibc), and can be refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moekit.runtime import tune_cpu_allocator

PROBE = """
import sys
from moekit.runtime import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tune" else False
import torch
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
before = rss_mb()
t = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
del t
print(applied, round(rss_mb() - before))
"""


def probe(mode: str, **env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_large_buffers_stay_in_the_process_only_when_tuned():
    tuned, kept = probe("tune")
    if not tuned:
        pytest.skip("this C library has no mallopt (not glibc)")
    assert kept >= 60  # the freed 64 MB stay mapped for the next tensor of that size
    _, kept_plain = probe("plain")
    assert kept_plain < 8  # glibc's default gives a 64 MB block back to the kernel on free


def test_opt_out_and_bad_threshold():
    assert probe("tune", MOEKIT_MALLOC_TUNING="0")[0] is False
    with pytest.raises(ValueError, match=r"threshold_bytes must be an integer in \(0, 2\*\*31\), got 0"):
        tune_cpu_allocator(0)
