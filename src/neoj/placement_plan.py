"""The memory planner of device maps, pure: memory budgets in, a Placement (or a refusal with advice) out.

sizes says what a model needs (the home device's part and each layer's weights and KV cache); plan_placement fills
devices in order with as many consecutive blocks as fit; plan_with_advice and advise say which cheaper dtype or
quantization would fit when nothing does; check_placement checks an explicit map against its devices' budgets.
Testable without the devices: neoj.placement reads this machine's free memory and calls these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .memory import (BYTES_PER_DTYPE, DTYPE_NAMES, GIB, RUNTIME_BYTES, MemoryPlanError, block_weight_bytes,
                     kv_cache_bytes, weight_bytes)
from .placement_map import Placement, block_runs

# On a device that holds blocks but not the embeddings: the activations copied in, one block's temporaries and
# the allocator's slack (the first device's RUNTIME_BYTES covers these and the runtime there).
DEVICE_RESERVE_BYTES = 256 << 20
NO_CHECK = ". (--no-memory-check / check_memory=False loads anyway.)"


@dataclass(frozen=True)
class Sizes:
    """Bytes a placement must find room for: the home device's part (embeddings, final norm, head, runtime) and
    each layer's (its weights and its KV cache)."""

    home: int
    layer: int
    dtype: str  # "float32", "bfloat16", "float16": what the model computes in
    quantize: str | None = None  # "int8", "int4" or None

    @property
    def label(self) -> str:
        """Returns what was sized, for messages: "float16", "int8 (bfloat16)"."""
        return f"{self.quantize} ({self.dtype})" if self.quantize else self.dtype

    @property
    def option(self) -> str:
        """Returns the flag that selects this configuration: "--dtype float16", "--quantize int8"."""
        return f"--quantize {self.quantize}" if self.quantize else f"--dtype {self.dtype}"


def sizes(cfg: ModelConfig, dtype: str | torch.dtype, quantize: str | None = None, group_size: int = 128,
          context: int | None = None, batch: int = 1) -> Sizes:
    """Returns the home and per-layer bytes of `cfg` computed in `dtype` (quantized linears with `quantize`), its KV
    cache holding `batch` sequences of `context` tokens (default: the whole context)."""
    name = DTYPE_NAMES.get(dtype, dtype)
    size = BYTES_PER_DTYPE[name]
    context = min(context or cfg.n_positions, cfg.n_positions)
    block = block_weight_bytes(cfg, size, quantize, group_size)
    home = weight_bytes(cfg, size, quantize, group_size) - cfg.n_layers * block + RUNTIME_BYTES
    kv = kv_cache_bytes(cfg, context, batch, size) // cfg.n_layers
    return Sizes(home, block + kv, name, quantize)


def plan_placement(cfg: ModelConfig, budgets: list[tuple[torch.device | str, int]], need: Sizes,
                   overflow: bool = False) -> Placement:
    """Returns where each block goes: devices taken in the order of `budgets` ((device, free bytes), GPUs first,
    then cpu), the first that can hold the embeddings and head with layer 0 becoming home (as an explicit map puts
    them), each filled with as many consecutive blocks as fit (a layer's weights and KV cache together) before the
    next. Raises MemoryPlanError saying how much is missing, unless `overflow`: then what does not fit goes to the
    last device anyway."""
    budgets = [(torch.device(d), int(b)) for d, b in budgets]
    start = next((i for i, (_, free) in enumerate(budgets) if free >= need.home + need.layer), None)
    if start is None and not overflow:
        raise MemoryPlanError(_short_message(cfg, budgets, need))
    start = start or 0
    home = budgets[start][0]
    blocks: list[torch.device] = []
    for j, (device, free) in enumerate(budgets[start:]):
        room = free - (need.home if j == 0 else DEVICE_RESERVE_BYTES)
        take = min(max(room, 0) // need.layer, cfg.n_layers - len(blocks))
        blocks += [device] * take
    if len(blocks) < cfg.n_layers:
        if not overflow:
            raise MemoryPlanError(_short_message(cfg, budgets, need))
        blocks += [budgets[-1][0]] * (cfg.n_layers - len(blocks))
    return Placement(home, tuple(blocks), block_runs(tuple(blocks)))


def _total(cfg: ModelConfig, need: Sizes) -> int:
    """Returns the bytes the whole model needs in one place."""
    return need.home + cfg.n_layers * need.layer


def _budget_text(budgets: list[tuple[torch.device, int]]) -> str:
    """Returns "cuda:0 11.2 GiB, cpu 30.0 GiB"."""
    return ", ".join(f"{d} {b / GIB:.1f} GiB" for d, b in budgets)


def _short_message(cfg: ModelConfig, budgets: list[tuple[torch.device, int]], need: Sizes) -> str:
    """Returns the refusal's first sentence: what the model needs, what the devices have, and how much is missing
    (plan_with_advice adds what would fit)."""
    total = _total(cfg, need)
    free = sum(b for _, b in budgets)
    missing = max(total - free, 0)
    short = f"{missing / GIB:.1f} GiB short" if missing else \
        "enough in all, but no device can hold the embeddings and head with a whole layer"
    return (f"the model ({cfg.num_parameters() / 1e9:.2f}B parameters, {cfg.n_layers} layers) needs about "
            f"{total / GIB:.1f} GiB in {need.label} (each layer {need.layer / GIB:.2f} GiB with its KV cache; "
            f"embeddings, head and runtime {need.home / GIB:.1f} GiB) but the devices have {_budget_text(budgets)}: "
            f"{short}.")


def _alternatives(need: Sizes) -> list[tuple[str, str | None]]:
    """Returns the cheaper (dtype, quantize) configurations than `need`'s, in the order to suggest them: bfloat16
    after float32 (as small as float16, and safe for GPT-Neo, whose attention overflows float16), then int8, int4."""
    if need.quantize == "int4":
        return []
    if need.quantize == "int8":
        return [("bfloat16", "int4")]
    half = [("bfloat16", None)] if BYTES_PER_DTYPE[need.dtype] > 2 else []
    return half + [("bfloat16", "int8"), ("bfloat16", "int4")]


def advise(cfg: ModelConfig, budgets: list[tuple[torch.device, int]], need: Sizes, group_size: int, context,
           batch: int) -> str:
    """Returns what would fit the budgets instead: each cheaper dtype or quantization that does, with the device map
    the planner would choose for it, or that nothing does."""
    fits = []
    for d, q in _alternatives(need):
        other = sizes(cfg, d, q, group_size, context, batch)
        try:
            placed = plan_placement(cfg, budgets, other)
        except MemoryPlanError:
            continue
        fits.append(f"{other.option} ({_total(cfg, other) / GIB:.1f} GiB, --device-map {placed.describe()})")
    if fits:
        return "These would fit: " + "; ".join(fits) + NO_CHECK
    return "No dtype or quantization fits; free memory, add a device, or plan a shorter context or smaller batch" \
        + NO_CHECK


def plan_with_advice(cfg: ModelConfig, budgets: list[tuple[torch.device | str, int]], dtype: str | torch.dtype,
                     quantize: str | None = None, group_size: int = 128, context: int | None = None,
                     batch: int = 1) -> Placement:
    """Returns plan_placement's split of the model over `budgets`; when it does not fit, raises MemoryPlanError
    naming what is missing and the dtypes or quantizations (with their device maps) that would fit."""
    budgets = [(torch.device(d), int(b)) for d, b in budgets]
    need = sizes(cfg, dtype, quantize, group_size, context, batch)
    try:
        return plan_placement(cfg, budgets, need)
    except MemoryPlanError as exc:
        raise MemoryPlanError(f"{exc} {advise(cfg, budgets, need, group_size, context, batch)}") from None


def check_placement(cfg: ModelConfig, placement: Placement, budgets: dict[torch.device, int], need: Sizes,
                    text: str) -> None:
    """Raises MemoryPlanError when an explicit map asks a device for more than its budget, naming the device and
    what it would hold (neoj.placement.plan_device_map adds what would fit instead)."""
    for device, free in budgets.items():
        layers = sum(1 for d in placement.blocks if d == device)
        used = layers * need.layer + (need.home if device == placement.home else DEVICE_RESERVE_BYTES)
        if used > free:
            holds = f"{layers} layer{'s' if layers != 1 else ''}"
            if device == placement.home:
                holds += " and the embeddings, head and runtime"
            raise MemoryPlanError(
                f"device map {text!r} asks {device} for about {used / GIB:.1f} GiB in {need.label} ({holds}) but it "
                f"has {free / GIB:.1f} GiB free; move layers to a device with room.")

