"""Device maps as a value: the Placement type (which device holds which block) and parsing explicit maps.

parse_device_map turns "0-13:cuda:0,14-27:cpu" (or {"0-13": "cuda:0", ...}) into a Placement, refusing with a
DeviceMapError that says what to write instead; Placement.describe writes one back as text. The syntax is described
in neoj.placement, which plans "auto" maps (neoj.placement_plan) and loads placed models (neoj.placement_load).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import NeojError

EXAMPLE_MAP = '"0-13:cuda:0,14-27:cuda:1"'


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
        return ",".join(f"{_range_text(r)}:{self.blocks[r.start]}" for r in self.ranges or block_runs(self.blocks))


def _range_text(r: range) -> str:
    """Returns "first-last" ("n" for one layer)."""
    return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def block_runs(blocks: tuple[torch.device, ...]) -> tuple[range, ...]:
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
    text = map_text(device_map)
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


def map_text(device_map) -> str:
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

