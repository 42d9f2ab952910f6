"""Keep freed host memory for reuse instead of handing it back to the operating system.

glibc's ``malloc`` serves blocks of 128 KiB and more from fresh ``mmap`` pages and unmaps them
when they are freed (and trims the top of its heap), so a loop whose tensors are freed and
allocated again at the same sizes every step, a forecast's rollout or a training loop on CPU,
touches all of its memory afresh at every step and pays a page fault per 4 KiB. Measured on
the demo's graph network (batch 4, one thread): 2,500-4,500 page faults per forward pass,
which took 1.2x to 1.9x the time of the same pass without them (``benchmarks/
bench_host_memory.py``; the cost of a fault varies with the machine's load). PyTorch's CPU performance
guide recommends a caching allocator (jemalloc or tcmalloc, preloaded) for this;
:func:`keep_freed_memory` gets the same reuse from glibc itself, with two ``mallopt`` settings:

* ``M_MMAP_THRESHOLD`` at glibc's largest value (32 MiB on 64-bit): blocks up to that size
  come from the heap, not from ``mmap``;
* ``M_TRIM_THRESHOLD`` at 1 GiB: freed memory stays in the heap for the next step.

The peak memory of a loop does not change (the same blocks are reused); the process keeps up
to that peak after the loop instead of returning it. The settings are process-wide; they are
applied once, on Linux with glibc only (elsewhere, e.g. macOS or musl, nothing changes).
"""
from __future__ import annotations

import ctypes
import sys

#: ``mallopt`` parameter numbers (glibc ``malloc.h``)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (glibc's largest ``M_MMAP_THRESHOLD`` on 64-bit)
MMAP_THRESHOLD_BYTES = 32 << 20
#: free memory at the top of the heap is returned only beyond this size
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def _set_malloc_thresholds() -> bool:
    """Apply both ``mallopt`` settings; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def keep_freed_memory() -> bool:
    """Make this process reuse freed host memory instead of page-faulting it in again (see
    the module's description). Idempotent; returns whether the settings are in force."""
    global _applied
    if _applied is None:
        _applied = _set_malloc_thresholds()
    return _applied
