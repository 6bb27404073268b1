"""CPU threading policy: OpenMP threads that sleep at barriers, and a thread count the user can set.

PyTorch's CPU ops run as OpenMP parallel regions, a few hundred per decoded token, each ending at a barrier.
By default OpenMP threads spin there. When another program holds one of the cores, the thread scheduled
beside it is descheduled, its partner spins away the other core's time, and every barrier waits for a
scheduler time slice: a decode several times slower than on one thread. Threads that sleep at the barrier
(OMP_WAIT_POLICY=PASSIVE) give the core back instead (BENCHMARKS.md, bench_threads). The OpenMP runtime
reads the variable once, when torch is first imported, so this module must run before that.
"""

from __future__ import annotations

import os
import sys


def prefer_sleeping_openmp_threads() -> None:
    """Sets OMP_WAIT_POLICY=PASSIVE for this process unless the user chose a policy or torch already started."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_thread_count(threads: int | None) -> None:
    """Uses `threads` CPU threads for PyTorch's ops (None keeps PyTorch's choice: one per core)."""
    if threads is None:
        return
    if threads < 1:
        from .errors import NeojError

        raise NeojError(f"--threads must be at least 1, not {threads}")
    import torch

    torch.set_num_threads(threads)
