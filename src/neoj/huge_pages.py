"""Moves a CPU model's large weights into memory that Linux backs with 2 MB pages (transparent huge pages).

Decoding reads every weight once per token, so a CPU decode step is a stream through gigabytes. From a
memory-mapped checkpoint or plain anonymous memory that stream crosses a 4 KB page every 4096 bytes: each
crossing can cost a TLB miss, and the hardware prefetchers stop at it. From 2 MB pages the same kernels
stream faster: GPT-J-arch fp32 decode held to AVX2 1.12-1.18x its memory-mapped checkpoint (BENCHMARKS.md, huge
pages A/B). PyTorch's CPU allocator asks for huge pages only when THP_MEM_ALLOC_ENABLE=1 was set before torch
started, and a memory-mapped checkpoint never gets them; so after loading, the large floating-point tensors are
copied, in model order, into one anonymous mapping advised with MADV_HUGEPAGE, and the parameters and buffers
point there.

Nothing changes off Linux, where the kernel's THP setting is "never", or with NEOJ_HUGE_PAGES=0 (which
keeps a full-precision checkpoint memory-mapped: it loads in milliseconds, and processes that map the same
file share its pages).
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
# Tensors smaller than a huge page stay where they are: they are read from cache, or too small to matter.
MIN_BYTES = HUGE_PAGE
_ALIGN = 64  # each tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """True where this process can ask for huge pages: Linux with THP not "never", NEOJ_HUGE_PAGES not 0."""
    if os.environ.get("NEOJ_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _movable(t: torch.Tensor) -> bool:
    """True for a floating-point CPU tensor of at least MIN_BYTES that is the whole of its storage (a view of part
    of a larger tensor is left with it). Integer tensors (int8 and int4 weights) stay: quantized checkpoints load
    into anonymous memory, and there huge pages measured 0.95-1.0x (BENCHMARKS.md, huge pages A/B)."""
    return (t.device.type == "cpu" and t.is_floating_point() and not t.is_sparse and t.nbytes >= MIN_BYTES
            and t.is_contiguous()
            and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes)


def _slots(model: nn.Module) -> list[tuple[torch.Tensor, list[tuple[nn.Module, str]]]]:
    """Returns each movable parameter and buffer once, in model order, with the (module, name) pairs of the
    buffers that hold it (parameters need none: the Parameter object itself is kept)."""
    found: dict[int, tuple[torch.Tensor, list]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not _movable(t):
                    continue
                entry = found.setdefault(id(t), (t, []))
                if table is module._buffers:
                    entry[1].append((module, name))
    return list(found.values())


def huge_page_region(nbytes: int) -> tuple[mmap.mmap, int]:
    """Returns an anonymous mapping of at least `nbytes` advised for huge pages, and the offset in it of the
    first 2 MB boundary (where the region's first huge page can start)."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    address = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    return region, -address % HUGE_PAGE


def move_to_huge_pages(model: nn.Module) -> int:
    """Copies the model's large CPU parameters and buffers into one huge-page region (see the module's
    docstring) and returns the bytes moved; 0 where huge pages are not available or nothing is large enough.

    Values, dtypes, shapes, tied parameters (a Parameter shared by two modules is one tensor) and
    requires_grad are kept; a tensor is freed as soon as its copy is made, so memory grows by at most one
    tensor at a time (a memory-mapped checkpoint's pages are the file's, and the OS drops them as needed).
    The region is one mapping: it is unmapped when the last tensor in it is freed (e.g. after model.to("cuda")
    or a dtype change), not piece by piece.
    """
    if not available():
        return 0
    slots = _slots(model)
    offsets, total = [], 0
    for t, _ in slots:
        offsets.append(total)
        total += -(-t.nbytes // _ALIGN) * _ALIGN
    if not total:
        return 0
    region, start = huge_page_region(total)
    for i, offset in enumerate(offsets):
        t, holders = slots[i]
        slots[i] = None  # the last reference to a buffer's old tensor goes with `t` below: freed before the next copy
        home = torch.frombuffer(region, dtype=torch.uint8, count=t.nbytes, offset=start + offset)
        home = home.view(t.dtype).view(t.shape)
        with torch.no_grad():
            home.copy_(t)
        if isinstance(t, nn.Parameter):
            t.data = home  # the same Parameter object: modules that share it still share it
        for module, name in holders:
            module._buffers[name] = home
        del t
    log.debug("moved %d tensors (%.1f MB) into huge pages", len(offsets), total / 2**20)
    return total
