"""Keep the memory a training step frees for the next step, instead of handing it back to the OS.

Every step of a search allocates and frees the same 1-32 MiB activation tensors. glibc's malloc serves blocks of
that size with fresh mmaps or returns them to the OS when the heap's top is free, and the kernels then fault the
pages back in one 4 KiB page at a time: 4,000-12,000 page faults and 10-30 ms of system time per fused mixed op
call at batch 64 (benchmarks/RESULTS.md). Raising glibc's mmap threshold to its largest value (32 MiB) and its
trim threshold to 1 GiB keeps freed blocks in the heap, where the next step finds them already mapped. The price:
the process holds on to its peak heap between steps instead of shrinking, which a search process reaches again
on its next step anyway.

The command-line runs and the benchmarks call keep_freed_memory() first; a program that imports fastdarts
decides for itself. Where the user already tuned the allocator (glibc's MALLOC_* variables or GLIBC_TUNABLES, or
a preloaded jemalloc or tcmalloc), or where the C library is not glibc, it changes nothing.

objects_so_far_frozen does the same for Python's own heap: a run's loop (fastdarts.runloop) leaves the objects that
outlive its steps out of the garbage collector's full collections while it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: 4 MiB * sizeof(long) on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30

# The user's own allocator settings, which win.
_USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_tuned_allocator() -> str | None:
    """The environment variable through which the user chose the allocator's settings, if any."""
    for name in _USER_SETTINGS:
        if name == "GLIBC_TUNABLES" and "glibc.malloc" not in os.environ.get(name, ""):
            continue
        if name in os.environ:
            return name
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB for reuse (this module's docstring says why). Returns True if
    it did, False where it changes nothing (not glibc, or the user's own allocator settings)."""
    if _user_tuned_allocator() is not None:
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc (musl and macOS have no such thresholds)
    for parameter, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"keep_freed_memory: glibc's mallopt({parameter}, {value}) failed")
    return True


@contextlib.contextmanager
def objects_so_far_frozen() -> Iterator[None]:
    """Leave the objects that exist on entry (torch's and the other libraries' modules, the network, the optimizer:
    about 400,000 in a search process) out of the garbage collector's full collections during the block. Each full
    collection walked them all, 100-200 ms, about once in 20 search steps at batch 64 and a few times a digits
    search.
    Undone on exit, so that a process running several searches still collects the cycles among one's objects once
    it is over; nothing is done when the program has frozen objects itself."""
    if gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
