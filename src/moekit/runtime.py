"""Process-level settings for CPU runs that no PyTorch API exposes.

glibc's malloc hands every allocation above a threshold (128 KB, growing to at most 32 MB) to the kernel with mmap
and gives it back on free. A training or prefill step on a CPU allocates and frees the same large activations
(tens of MB each: gathered expert rows, hidden activations, their gradients) every time, so every step maps them
fresh and page-faults them in again (on this project's 2-core VM, measured ad hoc, a 32 MB elementwise multiply
into a fresh tensor took 17 ms instead of 8 ms; `benchmarks/bench_layer.py --no-malloc-tuning` shows the effect).
`tune_cpu_allocator` raises the mmap and trim thresholds so freed blocks stay in the process and are reused (the
effect of `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`, set after start-up). The cost: memory freed by the
process is not returned to the system until it exits (its resident size stays at its peak). The `moekit` command
applies it (opt out with `MOEKIT_MALLOC_TUNING=0`); library users call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied = False


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep large freed CPU buffers in the process for reuse (glibc only; a no-op elsewhere).

    Args:
        threshold_bytes: allocations up to this size come from the heap and freed memory up to this size stays
            mapped (default 1 GiB).
    Returns:
        True if the thresholds are set (now or by an earlier call), False where they cannot be (not Linux with
        glibc) or the environment says MOEKIT_MALLOC_TUNING=0.
    Raises:
        ValueError: threshold_bytes is not a positive integer below 2**31.
    """
    global _applied
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or not 0 < threshold_bytes < 2**31:
        raise ValueError(f"threshold_bytes must be an integer in (0, 2**31), got {threshold_bytes!r}")
    if os.environ.get("MOEKIT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Some glibc releases cap the mmap threshold at 32 MB (HEAP_MAX_SIZE / 2) and refuse more: take the cap there.
    mapped = mallopt(_M_MMAP_THRESHOLD, threshold_bytes) or mallopt(_M_MMAP_THRESHOLD, min(threshold_bytes, 32 << 20))
    _applied = bool(mapped) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
    return _applied
