"""Tuning glibc's malloc for loading: freed tensors go back to the OS at once, and the heap is trimmed after.

Quantizing while loading frees a full-precision tensor for every weight it keeps; without this, the
peak memory of the same load varies widely from run to run. No effect (and no harm) off glibc.
"""

from __future__ import annotations


def return_freed_memory_promptly() -> None:
    """Makes glibc serve allocations of 1 MiB and more with mmap, so each freed tensor returns to the OS.

    Quantizing while loading frees a full-precision tensor for every weight it keeps. By default glibc
    raises its mmap threshold as large blocks are freed and then carves later tensors out of its heaps,
    where freed space interleaved with kept scales cannot be returned: measured on GPT-J-6B, the peak
    RSS of the same int8 load varied between 6.6 and 12 GB from run to run. A fixed threshold keeps it
    at the model's size. No effect (and no harm) off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it disables the adjustment)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Gives memory glibc holds free back to the OS (after loading)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
