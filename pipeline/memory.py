"""Give the allocator's free pages back to the system between phases and every few batches."""
from __future__ import annotations

import ctypes

try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # glibc only
except (OSError, AttributeError):
    _LIBC = None


def release_heap() -> None:
    """Give the allocator's free pages back to the system (glibc malloc_trim). Batches of slowly growing shapes
    (storage order is sorted by length) leave freed blocks that the next, larger one cannot reuse, and glibc keeps
    them: an evaluation over 128k cached examples on CPU grew past 3.9 GB RssAnon by its 500th batch without this
    (BENCHMARKS.md). Training and evaluation call it every LOG_EVERY batches,
    precompute between its phases; a no-op where there is no glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
