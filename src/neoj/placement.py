"""Placing a model's layers across devices (a device map): GPT-J across two 12 GB GPUs, or a GPU plus CPU memory.

The planner decides from free memory which blocks go where (pure functions of the budgets, testable without the
devices); the embeddings, final norm and LM head stay on the first device. Activations move once per boundary
(Transformer.block_devices) and each layer's keys and values live on its layer's device (neoj.kv_cache.LayerSplit).

A device map is written as
- "auto": every visible GPU's free memory in order, then CPU RAM; the planner fills each device with as many
  consecutive blocks as fit (the first also holds the embeddings, head and runtime) and refuses with advice
  when the model does not fit in all of them together;
- layer ranges, "0-13:cuda:0,14-27:cuda:1": inclusive ranges covering every layer once, in order, each on cpu,
  cuda or cuda:N (a single layer is "5:cpu"); the embeddings, final norm and head go with layer 0;
- in Python also a dict of the same ranges, {"0-13": "cuda:0", "14-27": "cpu"} (keys "first-last", "n" or an int).
Two ranges may name the same device: "0-1:cpu,2-3:cpu" runs as one device but keeps the KV cache in two pieces,
the split code path a machine without two GPUs can test.

Each device's budget is its free memory (torch.cuda.mem_get_info, MemAvailable for cpu), or NEOJ_MEMORY_LIMIT
where set (see neoj.memory.memory_limit: it then stands for each device's free memory).

The entry points live here: plan_device_map (read this machine's free memory, then plan or check a map) and
load_placed. The parts: neoj.placement_map (the Placement type, parsing explicit maps), neoj.placement_plan (the
planner, pure: budgets in, Placement out) and neoj.placement_load (each tensor loaded onto its device).
"""

from __future__ import annotations

import logging

import torch

from .config import ModelConfig
from .memory import MemoryPlanError, memory_limit
from .placement_load import load_placed
from .placement_map import EXAMPLE_MAP, DeviceMapError, Placement, map_text, parse_device_map
from .placement_plan import (DEVICE_RESERVE_BYTES, DTYPE_NAMES, NO_CHECK, Sizes, advise, check_placement,
                             plan_placement, plan_with_advice, sizes)

__all__ = [
    "DEVICE_RESERVE_BYTES", "DTYPE_NAMES", "EXAMPLE_MAP", "NO_CHECK", "DeviceMapError", "Placement", "Sizes",
    "advise", "check_placement", "device_budgets", "free_bytes", "load_placed", "parse_device_map", "plan_device_map",
    "plan_placement", "plan_with_advice", "sizes",
]

log = logging.getLogger(__name__)


def free_bytes(device: torch.device) -> int:
    """Returns the bytes free on `device` (MemAvailable for cpu), or NEOJ_MEMORY_LIMIT where set."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = 1 << 62
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return memory_limit(free)


def device_budgets() -> list[tuple[torch.device, int]]:
    """Returns what "auto" fills, in order: each visible CUDA device's free memory, then CPU RAM."""
    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [(d, free_bytes(d)) for d in gpus] + [(torch.device("cpu"), free_bytes(torch.device("cpu")))]


def plan_device_map(device_map: str | dict, cfg: ModelConfig, dtype: torch.dtype, spec=None,
                    context: int | None = None, batch: int = 1, check: bool = True) -> Placement:
    """Returns the Placement a device map asks for: "auto" (the planner splits by free memory) or explicit layer
    ranges ("0-13:cuda:0,14-27:cpu"); raises MemoryPlanError with advice when nothing fits (check=False: "auto" puts
    what does not fit on the last device, and explicit maps are not checked) and DeviceMapError for a bad map."""
    quantize, group_size = (spec.scheme, spec.group_size) if spec is not None else (None, 128)
    if isinstance(device_map, str) and device_map.strip().lower() == "auto":
        budgets = device_budgets()
        if check:
            placement = plan_with_advice(cfg, budgets, dtype, quantize, group_size, context, batch)
        else:
            placement = plan_placement(cfg, budgets, sizes(cfg, dtype, quantize, group_size, context, batch), True)
    else:
        placement = parse_device_map(device_map, cfg.n_layers)
        if check:
            _check_explicit(cfg, placement, map_text(device_map), dtype, quantize, group_size, context, batch)
    log.info("device map: %s (embeddings and head on %s)", placement.describe(), placement.home)
    return placement


def _check_explicit(cfg: ModelConfig, placement: Placement, text: str, dtype: torch.dtype, quantize: str | None,
                    group_size: int, context: int | None, batch: int) -> None:
    """Raises MemoryPlanError with advice when an explicit map's devices lack the memory it asks of them."""
    devices = list(dict.fromkeys((placement.home, *placement.blocks)))
    budgets = {d: free_bytes(d) for d in devices}
    need = sizes(cfg, dtype, quantize, group_size, context, batch)
    try:
        check_placement(cfg, placement, budgets, need, text)
    except MemoryPlanError as exc:
        ordered = list(budgets.items())
        try:
            advice = f"This would fit: --device-map {plan_placement(cfg, ordered, need).describe()}{NO_CHECK}"
        except MemoryPlanError:
            advice = advise(cfg, ordered, need, group_size, context, batch)
        raise MemoryPlanError(f"{exc} {advice}") from None
