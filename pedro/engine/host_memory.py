"""The host allocator's policy for a CPU engine: freed memory kept for reuse instead of given back.

A prefill's intermediates are megabytes to tens of megabytes each (SmolLM2, 32 prompts of 96 tokens: 38 MB for
gate|up's product, 19 MB for the activation) and each lives for one layer. glibc's malloc serves a block above
its mmap threshold (128 KB at start, raised to the size of such blocks as they are freed, at most 32 MB) with a
fresh mapping, and gives the top of its heap back to the system once more than twice the threshold is free there;
so each layer of each prefill faults its intermediates' pages in again, every page zeroed by the kernel (~400,000
page faults for that prefill). With the threshold at its maximum from the start and the heap never trimmed, a
prefill reuses what the last one freed: ~9x fewer page faults and a 1.09-1.15x faster prefill in fp32 on a 2-core
AMD EPYC (docs/engine.md, "Host memory"). Blocks above 32 MB are still mapped per use (glibc's limit), and the
process keeps its high-water mark of freed memory, as a GPU's caching allocator does.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: HEAP_MAX_SIZE / 2 on a 64-bit system
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the heap's top is given back only past 2 GiB free


def keep_freed_memory() -> bool:
    """Set this process's glibc malloc to keep freed blocks of up to 32 MB for reuse (process-wide, idempotent).
    -> whether it applies: False on a system without glibc, where the allocator is left as it is."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") if sys.platform.startswith("linux") else None
        mallopt = ctypes.CDLL(None).mallopt if glibc else None  # the process's own C library
    except (ValueError, OSError, AttributeError):  # no such name here, or no mallopt
        return False
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
