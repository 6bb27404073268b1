"""CPU threading policy: OpenMP threads that sleep at barriers when other work holds the CPUs, and a thread count
the user can set.

PyTorch's CPU ops (and neoj's row kernels) run as OpenMP parallel regions, a few hundred per decoded token,
each ending at a barrier. Threads that spin there hand the next region over in microseconds, and on an idle
machine that is the fastest: libgomp's default, a short spin, then sleep. When another program holds one of
the cores, the thread scheduled beside it is descheduled, its partner spins away the other core's time, and
every barrier waits for a scheduler time slice: a decode several times slower than on one thread. Threads that
sleep at the barrier (OMP_WAIT_POLICY=PASSIVE) give the core back instead, but waking them costs tens of
microseconds a region, which on an idle machine halves a small model's decode (BENCHMARKS.md, bench_threads).
So neoj looks once, when it is imported, at how busy the CPUs are, and asks for sleeping threads only when
another program holds about a core. The OpenMP runtime reads the variable once, when torch is first imported,
so this module must run before that; a server started on a quiet machine keeps spinning threads, and
OMP_WAIT_POLICY=PASSIVE (or ACTIVE) set by the user always wins.
"""

from __future__ import annotations

import os
import sys
import time

# Sampled at import: how long to watch the CPUs, and how much of a core other work may hold before neoj asks
# for sleeping threads.
SAMPLE_SECONDS = 0.05
BUSY_CORES = 0.5


def prefer_sleeping_openmp_threads() -> None:
    """Sets OMP_WAIT_POLICY=PASSIVE for this process when other work holds the CPUs (see busy_cores), unless the
    user chose a policy or torch already started."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    busy = busy_cores()
    if busy is None or busy >= BUSY_CORES:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """Returns how many cores other work kept busy over the next `seconds` (from /proc/stat; this process is
    asleep meanwhile), or None where that cannot be read (then neoj takes the safe choice, sleeping threads)."""
    first = _cpu_times()
    time.sleep(seconds)
    second = _cpu_times()
    if first is None or second is None:
        return None
    busy, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return busy / total * _cpu_count()


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat's first line; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def _cpu_count() -> int:
    return os.cpu_count() or 1


def set_thread_count(threads: int | None) -> None:
    """Uses `threads` CPU threads for PyTorch's ops (None keeps PyTorch's choice: one per core)."""
    if threads is None:
        return
    if threads < 1:
        from .errors import NeojError

        raise NeojError(f"--threads must be at least 1, not {threads}")
    import torch

    torch.set_num_threads(threads)
