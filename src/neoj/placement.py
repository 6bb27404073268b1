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
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import NeojError
from .memory import (BYTES_PER_DTYPE, GIB, RUNTIME_BYTES, MemoryPlanError, block_weight_bytes, kv_cache_bytes,
                     memory_limit, weight_bytes)
from .model import Transformer
from .weights import build_meta, expected_tensors, fill_model, random_tensors, read_checkpoint, weight_files

log = logging.getLogger(__name__)

# On a device that holds blocks but not the embeddings: the activations copied in, one block's temporaries and
# the allocator's slack (the first device's RUNTIME_BYTES covers these and the runtime there).
DEVICE_RESERVE_BYTES = 256 << 20
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
EXAMPLE_MAP = '"0-13:cuda:0,14-27:cuda:1"'
NO_CHECK = ". (--no-memory-check / check_memory=False loads anyway.)"


class DeviceMapError(NeojError, ValueError):
    """A device map that does not place every layer exactly once on a device this machine has."""


@dataclass(frozen=True)
class Placement:
    """Where a model's parts go: the embeddings, final norm and head on `home`; block i on blocks[i].

    `ranges` are the device map's layer ranges (consecutive, covering every block): the KV cache keeps one piece
    per range, even where two ranges share a device (empty: one per run of blocks on one device).
    """

    home: torch.device
    blocks: tuple[torch.device, ...]
    ranges: tuple[range, ...] = ()

    @property
    def split(self) -> bool:
        """Returns True when the blocks do not all sit, in one range, on the home device."""
        return len(self.ranges) > 1 or any(d != self.home for d in self.blocks)

    def describe(self) -> str:
        """Returns the placement as an explicit device map, e.g. "0-13:cuda:0,14-27:cuda:1"."""
        return ",".join(f"{_range_text(r)}:{self.blocks[r.start]}" for r in self.ranges or _runs(self.blocks))


def _range_text(r: range) -> str:
    """Returns "first-last" ("n" for one layer)."""
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def _runs(blocks: tuple[torch.device, ...]) -> tuple[range, ...]:
    """Returns the ranges of consecutive blocks on one device."""
    runs: list[range] = []
    for i, device in enumerate(blocks):
        if runs and blocks[runs[-1].start] == device:
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return tuple(runs)


# ---------------------------------------------------------------------------------------------------------
# Parsing explicit maps


def parse_device_map(device_map: str | dict, n_layers: int, cuda_devices: int | None = None) -> Placement:
    """Returns the Placement of an explicit device map ("0-13:cuda:0,14-27:cpu" or {"0-13": "cuda:0", ...}) for a
    model of `n_layers` blocks; raises DeviceMapError naming the map and what to write instead. `cuda_devices`:
    how many CUDA devices exist (default: this machine's)."""
    text = _map_text(device_map)
    pairs = _map_pairs(device_map, text)
    if not pairs:
        raise DeviceMapError(f"device map {text!r} names no layers; write \"auto\" or layer ranges like "
                             f"{_example(n_layers)}")
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    devices = [_parse_device(name, text, cuda_devices, n_layers) for _, name in pairs]
    example = _example(n_layers, (str(devices[0]), str(devices[-1])))  # the map's own devices, in messages
    ranges = [_parse_range(layers, text, n_layers, example) for layers, _ in pairs]
    _check_cover(ranges, text, n_layers, example)
    blocks = tuple(d for r, d in zip(ranges, devices) for _ in r)
    return Placement(devices[0], blocks, tuple(ranges))


def _map_text(device_map) -> str:
    """Returns the map as a user would write it, for messages."""
    if isinstance(device_map, dict):
        return ",".join(f"{k}:{v}" for k, v in device_map.items())
    if isinstance(device_map, str):
        return device_map
    raise DeviceMapError(f"device map {device_map!r} is neither a string nor a dict; write \"auto\" or layer ranges "
                         f"like {EXAMPLE_MAP}")


def _map_pairs(device_map: str | dict, text: str) -> list[tuple[str, str]]:
    """Returns the map's (layers, device) texts, in the order written."""
    if isinstance(device_map, dict):
        return [(str(k).strip(), str(v).strip()) for k, v in device_map.items()]
    pairs: list[tuple[str, str]] = []
    if not text.strip():
        return pairs
    for part in (p.strip() for p in text.split(",")):
        layers, sep, device = part.partition(":")
        if not part or not sep:
            raise DeviceMapError(f"device map {text!r}: {part!r} is not LAYERS:DEVICE; write layer ranges like "
                                 f"{EXAMPLE_MAP}")
        pairs.append((layers.strip(), device.strip()))
    return pairs


def _example(n_layers: int, devices: tuple[str, str] = ("cuda:0", "cuda:1")) -> str:
    """Returns an example map splitting `n_layers` layers in two halves over `devices`."""
    if n_layers < 2:
        return f'"0:{devices[0]}"'
    half = n_layers // 2
    return f'"{_range_text(range(0, half))}:{devices[0]},{_range_text(range(half, n_layers))}:{devices[1]}"'


def _parse_range(layers: str, text: str, n_layers: int, example: str) -> range:
    """Returns the range of "first-last" or "n" (inclusive), checked against the model's layers."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", layers)
    if m is None:
        raise DeviceMapError(f"device map {text!r}: {layers!r} is not a layer range; write FIRST-LAST (inclusive) "
                             f"or one layer number, e.g. {example}")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if last < first:
        raise DeviceMapError(f"device map {text!r}: range {layers!r} ends before it starts; write it first-last "
                             f"({last}-{first})")
    if last >= n_layers:
        raise DeviceMapError(f"device map {text!r}: layer {last} is out of range: the model has layers 0-"
                             f"{n_layers - 1}; e.g. {example}")
    return range(first, last + 1)


def _parse_device(name: str, text: str, cuda_devices: int, n_layers: int) -> torch.device:
    """Returns the device `name` (cpu, cuda, cuda:N) names, checked against the devices this machine has."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise DeviceMapError(f"device map {text!r}: unknown device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if cuda_devices == 0:
        raise DeviceMapError(f"device map {text!r} puts layers on {name} but this PyTorch has no CUDA device; "
                             f"use cpu (e.g. \"0-{n_layers - 1}:cpu\") or --device-map auto")
    index = device.index or 0
    if index >= cuda_devices:
        raise DeviceMapError(f"device map {text!r} puts layers on {name} but only {cuda_devices} CUDA device"
                             f"{'s are' if cuda_devices > 1 else ' is'} visible (cuda:0-cuda:{cuda_devices - 1})")
    return torch.device("cuda", index)


def _check_cover(ranges: list[range], text: str, n_layers: int, example: str) -> None:
    """Raises DeviceMapError unless the ranges cover layers 0..n_layers-1 exactly once, in order."""
    expected = 0
    for r in ranges:
        if r.start > expected:
            gap = _range_text(range(expected, r.start))
            raise DeviceMapError(f"device map {text!r} leaves layer{'s' if r.start - expected > 1 else ''} {gap} "
                                 f"unplaced; cover layers 0-{n_layers - 1} exactly once, in order, e.g. {example}")
        if r.start < expected:
            raise DeviceMapError(f"device map {text!r} places layer {r.start} twice (or out of order); cover layers "
                                 f"0-{n_layers - 1} exactly once, in order, e.g. {example}")
        expected = r.stop
    if expected < n_layers:
        rest = range(expected, n_layers)
        raise DeviceMapError(f"device map {text!r} leaves layer{'s' if len(rest) > 1 else ''} {_range_text(rest)} "
                             "unplaced; "
                             f"cover layers 0-{n_layers - 1} exactly once, e.g. {example}")


# ---------------------------------------------------------------------------------------------------------
# Sizes and the planner (pure: budgets in, Placement out)


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
    return Placement(home, tuple(blocks), _runs(tuple(blocks)))


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
    what it would hold (_check_explicit adds what would fit instead)."""
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


# ---------------------------------------------------------------------------------------------------------
# Free memory and the entry points api.load calls


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
            _check_explicit(cfg, placement, _map_text(device_map), dtype, quantize, group_size, context, batch)
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


# ---------------------------------------------------------------------------------------------------------
# Loading


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class _Placer:
    """The fill_model transform of a placed model: each tensor goes to its block's device (the rest to home),
    in `dtype`; with `stored` (a quantized checkpoint's spec) its quantized layers are put in place there, else
    with `spec` each linear is quantized there as it arrives."""

    def __init__(self, model: Transformer, placement: Placement, dtype: torch.dtype, spec=None, stored=None):
        self.placement, self.dtype = placement, dtype
        self.quantizing = stored is None and spec is not None  # streaming quantization (row sinks, a tied head)
        self.by_device = None
        devices = dict.fromkeys((placement.home, *placement.blocks))
        if stored is not None:
            from .quantize import PutQuantized

            self.by_device = {d: PutQuantized(model, stored, dtype, d) for d in devices}
        elif spec is not None:
            from .quantize import StreamingQuantizer

            self.by_device = {d: StreamingQuantizer(model, spec, dtype, d) for d in devices}

    def device_of(self, name: str) -> torch.device:
        """Returns the device of the neoj parameter `name`."""
        m = _BLOCK.match(name)
        return self.placement.blocks[int(m.group(1))] if m else self.placement.home

    def __call__(self, name: str, value):
        device = self.device_of(name)
        if self.by_device is not None:
            return self.by_device[device](name, value)
        return value.to(device=device, dtype=self.dtype)

    def row_sink(self, name: str, shape: tuple):
        """Quantizes a weight block by block on its device while quantizing (None: take it whole)."""
        if not self.quantizing:
            return None
        return self.by_device[self.device_of(name)].row_sink(name, shape)

    def finish(self, model: Transformer) -> Transformer:
        """Puts a quantized copy of a tied head in place (on home); returns the model."""
        if self.quantizing:
            return self.by_device[self.placement.home].finish(model)
        return model


def load_placed(directory: Path | None, cfg: ModelConfig, dtype: torch.dtype, placement: Placement, spec=None,
                stored=None, seed: int = 0) -> Transformer:
    """Returns the model in `directory` (None: random weights drawn with `seed`) with each tensor loaded straight
    onto its device.

    Random weights are drawn on the CPU, so a placed random model equals the unplaced CPU one of the same seed.
    With `spec` each linear is quantized on its device as it loads; `stored` reads a quantized checkpoint.
    """
    if len(placement.blocks) != cfg.n_layers:
        raise NeojError(f"the placement has {len(placement.blocks)} blocks but the model {cfg.n_layers}")
    model = build_meta(cfg)
    placer = _Placer(model, placement, dtype, spec, stored)
    expected = expected_tensors(model)
    if directory is None:
        tensors = random_tensors(model, torch.device("cpu"), seed)
    elif stored is not None:
        from .errors import CheckpointError
        from .quantize import read_quantized

        files = weight_files(directory)
        if any(f.suffix != ".safetensors" for f in files):
            raise CheckpointError(f"{directory}: a quantized checkpoint must be safetensors")
        if cfg.tie_word_embeddings:  # a head tied to the embedding has its own quantized copy
            expected["lm_head.weight"] = model.lm_head.weight
        tensors = read_quantized(files, stored)
    else:
        tensors = read_checkpoint(weight_files(directory), dtype if spec is None else None)
    fill_model(model, tensors, dtype, placement.home, placer, expected)
    model = placer.finish(model)
    if placement.split:
        model.block_devices = list(placement.blocks)
        # The map's ranges: the KV cache keeps one piece per range (neoj.kv_cache.cache_pieces).
        model.block_ranges = placement.ranges or _runs(placement.blocks)
    return model.eval()
