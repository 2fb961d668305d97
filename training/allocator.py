"""Keep the memory a CPU training step frees for the next step, instead of handing it back to the system.

Every training step allocates and frees the same few hundred MB of activations and gradients. glibc's
malloc (Linux) serves big blocks with `mmap` and unmaps them when they are freed, and trims the heap
whenever its free top grows past a threshold, so the next step gets fresh pages from the kernel and
touches them in one page fault per 4 KB. With `mmap` off and trimming off, freed blocks stay in the
heap and the next step reuses them. An 80-step run of the default 5-minute model took 3.4-3.5 million
page faults without this setting and 0.25 million with it, and its median step was 2.5%, 3.5% and 21%
faster in three alternating pairs (benchmarks/NOTES.md, which also has the suite's runs: MFU 56%
after, 45% before). The price is that the process keeps its peak memory until it exits, which a
training process reaches in its first step anyway.

PyTorch's CPU tensors come from malloc, so this is two `mallopt` calls. Other C libraries (macOS,
musl) have no such settings; there it does nothing. (jemalloc or tcmalloc, preloaded, do the same and
more, but need an install and a restart.)
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc to serve every block from its heap and never give the heap back; False where it cannot."""
    if platform.libc_ver()[0] != "glibc":  # macOS, musl: no such settings
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
