"""Many LoRA adapters served over one base model, each row of a batch with its own (punica / S-LoRA style).

`load_adapter(model, name, directory)` reads a PEFT adapter and wraps each linear layer it targets in an
AdapterLinear (nn.Linear, DecodeLinear or QuantLinear alike), which keeps every served adapter's A and B
for that layer. Nothing is merged: the base weights are read once per step for all rows, and each row adds
its own adapter's low-rank product x @ A^T @ B^T * scaling, computed in the activation dtype.

How a row's choice reaches the layers: the model holds one ServedAdapters, whose AdapterRouting the
wrappers share. The engine opens `routed(model, names)` around each forward (prefill and decode), naming
each row's adapter (None: the base); outside it the routing is empty, so scoring, embeddings and any other
forward run the base model. The routing holds the choice in two forms:

- `groups`, [(slot, row indices)] for each adapter present: with one adapter in the step, the eager path
  multiplies its rows by that adapter's own A and B (its own rank, no padding) and adds the result into
  them (punica's SGMV; no gather at all when every row has it).
- `index`, a fixed (capacity,) device buffer of each row's slot (0 = base): a fixed-shape step (a CUDA
  graph, `static()`) gathers per-row A and B from rank-padded stacks whose slot 0 is zero (punica's
  BGMV), so one recorded graph replays for any mix of adapters; only the buffer's contents change. Eager
  steps with two adapters or more take this path too: its few batched operations cost less than a
  gather, two products and a scatter per adapter (bench_adapters).

A step with no adapter row leaves the routing inactive: every wrapper returns its base layer's output
untouched, at the cost of one attribute test, and a graphed step replays its base graph.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, GenerationError, NeojError
from .weights import build_meta, neoj_to_hf_name

ATTRIBUTE = "served_adapters"  # where a model keeps its ServedAdapters
_NAME = re.compile(r"^[^\s/\\][^\s]*$")


class AdapterRouting:
    """Which adapter each row of the current forward runs with; shared by all of one model's wrappers."""

    def __init__(self, device: torch.device, capacity: int = 64):
        self.device = device
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, row indices) per adapter present
        self.index = torch.zeros(capacity, dtype=torch.long, device=device)  # slot per row, for static steps
        self.use_index = False  # True inside static(): wrappers read `index` instead of `groups`
        self.version = 0  # bumped when stacks or the buffer change: a recorded graph of an older one is stale

    @property
    def active(self) -> bool:
        """Returns True while the current forward has at least one adapter row."""
        return bool(self.groups)

    def set(self, slots: list[int]) -> None:
        """Routes row i to slot slots[i] (0: the base) for the next forward."""
        if len(slots) > self.index.numel():
            self.index = torch.zeros(max(len(slots), 2 * self.index.numel()), dtype=torch.long, device=self.device)
            self.version += 1
        row_slots = torch.tensor(slots + [0] * (self.index.numel() - len(slots)), dtype=torch.long)
        self.index.copy_(row_slots)
        present = sorted(set(slots) - {0})
        self.groups = [(s, torch.tensor([i for i, x in enumerate(slots) if x == s], device=self.device))
                       for s in present]

    def clear(self) -> None:
        """Routes every row to the base again."""
        self.groups = []
        self.use_index = False

    @contextlib.contextmanager
    def static(self):
        """Makes the wrappers read the fixed `index` buffer (a fixed-shape or graphed step) inside the block."""
        self.use_index = True
        try:
            yield
        finally:
            self.use_index = False


class AdapterLinear(nn.Module):
    """A base linear layer (any kind) plus the low-rank updates of the adapters that target it, by slot."""

    def __init__(self, base: nn.Module, routing: AdapterRouting):
        super().__init__()
        self.base, self.routing = base, routing
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A (r, in), B*scaling (out, r))
        self.a_stack: torch.Tensor | None = None  # (slots + 1, R, in), slot 0 and padding zero
        self.b_stack: torch.Tensor | None = None  # (slots + 1, out, R)

    def add(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Adds an adapter's A (r, in) and scaled B (out, r) under `slot` (then call stack())."""
        self.pairs[slot] = (a, b)

    def stack(self, slots: int) -> None:
        """Builds the rank-padded stacks of `slots` slots (every served adapter and the base, slot 0)."""
        a, b = next(iter(self.pairs.values()))
        rank = max(p[0].shape[0] for p in self.pairs.values())
        a_stack = a.new_zeros(slots, rank, self.in_features)
        b_stack = b.new_zeros(slots, self.out_features, rank)
        for s, (sa, sb) in self.pairs.items():
            a_stack[s, : sa.shape[0]] = sa
            b_stack[s, :, : sb.shape[1]] = sb
        self.a_stack, self.b_stack = a_stack, b_stack

    @property
    def weight(self) -> torch.Tensor:
        """Returns the base layer's weight (code that reads .weight keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        routing = self.routing
        if not routing.active:
            return y
        if routing.use_index or (len(routing.groups) > 1 and self.a_stack is not None):
            # One gather of every row's A and B and two batched products, whatever the number of adapters:
            # fewer, larger operations than a gather-multiply-scatter per adapter (bench_adapters).
            return y + self._stacked(x, routing.index[: x.shape[0]])
        for slot, rows in routing.groups:
            pair = self.pairs.get(slot)
            if pair is None:
                continue
            a, b = pair
            if rows.numel() == x.shape[0]:  # every row on this adapter: no gather, no scatter
                y.add_(((x @ a.t()) @ b.t()).to(y.dtype))
            else:  # index_put_ with accumulate: 3x faster than index_add_ here (bench_adapters)
                y.index_put_((rows,), ((x.index_select(0, rows) @ a.t()) @ b.t()).to(y.dtype), accumulate=True)
        return y

    def _stacked(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Returns every row's low-rank product (B, T, out) from the stacks (fixed shapes: graph-safe)."""
        a = self.a_stack.index_select(0, index)  # (B, R, in)
        b = self.b_stack.index_select(0, index)  # (B, out, R)
        flat = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, in)
        return torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)).view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.pairs)}"


@dataclass
class AdapterInfo:
    """One served adapter: its name, directory, rank, scale and the layers it changes."""

    name: str
    directory: str
    slot: int
    r: int
    alpha: float
    target_modules: list[str]
    layers: list[str] = field(default_factory=list)


class ServedAdapters:
    """The adapters a model serves, by name, and the routing its wrapped layers share."""

    def __init__(self, device: torch.device):
        self.routing = AdapterRouting(device)
        self.adapters: dict[str, AdapterInfo] = {}

    @property
    def names(self) -> list[str]:
        """Returns the served adapters' names, in loading order."""
        return list(self.adapters)

    def slots(self, names: list[str | None]) -> list[int]:
        """Returns each row's slot (0 for None, the base); raises GenerationError for an unknown name."""
        for name in names:
            if name is not None and name not in self.adapters:
                check_name_served(self.names, name)
        return [self.adapters[n].slot if n is not None else 0 for n in names]


def served_adapters(model: nn.Module) -> ServedAdapters | None:
    """Returns the model's ServedAdapters, or None when it serves none."""
    return getattr(model, ATTRIBUTE, None)


def adapter_names(model: nn.Module) -> list[str]:
    """Returns the names of the adapters the model serves (empty when none)."""
    served = served_adapters(model)
    return served.names if served is not None else []


def check_name_served(names: list[str], name: str | None) -> None:
    """Raises GenerationError unless `name` is None (the base) or one of the served adapter `names`."""
    if name is None or name in names:
        return
    served = f"the served adapters are {', '.join(names)}" if names else "this model serves no adapters"
    raise GenerationError(f"unknown adapter {name!r}: {served} (or none, for the base model)")


def check_adapter_request(model: nn.Module, name: str | None) -> None:
    """Raises GenerationError if a request names an adapter `model` does not serve (called at submit)."""
    if name is not None:
        check_name_served(adapter_names(model), name)


@contextlib.contextmanager
def routed(model: nn.Module, names: list[str | None]):
    """Runs the block's forward with row i on adapter names[i] (None: the base); free when no row has one."""
    if all(n is None for n in names):
        yield
        return
    served = served_adapters(model)
    if served is None:  # never silently the base model for a row that asked for an adapter
        check_name_served([], next(n for n in names if n is not None))
    served.routing.set(served.slots(names))
    try:
        yield
    finally:
        served.routing.clear()


def _check_new_name(name: str, served: ServedAdapters | None, reserved: tuple[str, ...]) -> None:
    """Raises NeojError for a name that is empty, has spaces, is taken, or is one of the base model's ids."""
    if served is not None and name in served.adapters:
        raise NeojError(f"an adapter named {name!r} is already loaded (from {served.adapters[name].directory}); "
                        "give each adapter its own name")
    if isinstance(name, str) and any(name.lower() == r.lower() for r in reserved if r):
        raise NeojError(f"adapter name {name!r} is the base model's id; requests naming it get the base model, "
                        "so give the adapter another name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise NeojError(f"adapter name {name!r} must be non-empty, without spaces, and not start with a slash")


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Returns a PEFT directory's tensors by key, without the adapter name PEFT may keep (".default.")."""
    from safetensors.torch import load_file

    file = directory / "adapter_model.safetensors"
    try:
        if file.exists():
            tensors = load_file(str(file))
        else:
            file = directory / "adapter_model.bin"
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip each raise their own kinds
        raise CheckpointError(f"{file} could not be read as LoRA weights: {str(exc).splitlines()[0]}") from exc
    return {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k): v for k, v in tensors.items()}


def _read_pairs(model: nn.Module, directory: str | os.PathLike, base: str):
    """Returns (LoraConfig, {layer name: (A, B * scaling)}) in the model's dtype and device, all checked."""
    from .train.lora import PEFT_PREFIX, check_adapter, target_layers

    cfg = model.config
    lora = check_adapter(directory, cfg, base)  # a missing directory or a shape mismatch: one clear line
    tensors = _read_tensors(Path(directory))
    dtype, device = model.wte.weight.dtype, model.wte.weight.device
    pairs = {}
    for layer in target_layers(build_meta(cfg), lora.target_modules):
        if layer == "lm_head":
            continue
        key = PEFT_PREFIX + neoj_to_hf_name(layer + ".weight", cfg.model_type)[: -len(".weight")]
        try:
            a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        except KeyError as exc:
            raise CheckpointError(f"LoRA adapter {directory} has no tensor {exc.args[0]}") from None
        pairs[layer] = (a.to(device, dtype), (b.float() * lora.scaling).to(device, dtype))
    return lora, pairs


def load_adapter(model: nn.Module, name: str, directory: str | os.PathLike, base: str = "the base model",
                 reserved: tuple[str, ...] = ()) -> AdapterInfo:
    """Serves the PEFT LoRA adapter in `directory` as `name` on `model` (rows naming it use it); returns its info.

    `base` names the model in error messages, `reserved` holds names an adapter may not take (the model's
    ids). Everything is checked and read before the model changes, so a refused adapter leaves it as it was.
    Load adapters before the model serves requests (a server loads them at start).
    """
    if getattr(model, "tensor_parallel", None) is not None or getattr(model, "block_devices", None) is not None:
        raise NeojError(f"LoRA adapters are not served on a model split over processes or devices (--tp, "
                        f"--device-map); refused {name!r}. Serve adapters on one device, or merge the adapter into "
                        "the model (neoj merge) and load that")
    served = served_adapters(model)
    _check_new_name(name, served, reserved)
    lora, pairs = _read_pairs(model, directory, base)
    if served is None:
        served = ServedAdapters(model.wte.weight.device)
        setattr(model, ATTRIBUTE, served)
    slot = len(served.adapters) + 1
    for layer, (a, b) in pairs.items():
        module = model.get_submodule(layer)
        if not isinstance(module, AdapterLinear):
            module = AdapterLinear(module, served.routing)
            parent, _, leaf = layer.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module)
        module.add(slot, a, b)
    for module in model.modules():  # every wrapper's stacks gain the new slot (zero where it has no layer)
        if isinstance(module, AdapterLinear):
            module.stack(slot + 1)
    served.routing.version += 1  # new stacks: graphs recorded with the old ones are stale
    info = AdapterInfo(name, os.fspath(directory), slot, lora.r, lora.alpha, list(lora.target_modules), list(pairs))
    served.adapters[name] = info
    return info


def load_adapters(model: nn.Module, adapters: dict[str, str | os.PathLike], base: str = "the base model",
                  reserved: tuple[str, ...] = ()) -> list[AdapterInfo]:
    """Loads each {name: directory} with load_adapter; returns their infos. One already served under the same
    name from the same directory is kept as it is (a server made again over the same model)."""
    infos = []
    for name, directory in adapters.items():
        served = served_adapters(model)
        known = served.adapters.get(name) if served is not None else None
        if known is not None and Path(known.directory).resolve() == Path(directory).resolve():
            infos.append(known)
            continue
        infos.append(load_adapter(model, name, directory, base, reserved))
    return infos


def split_adapter_specs(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """Returns (the one adapter to merge, {name: directory} to serve) from `--adapter` values: DIR or NAME=DIR.

    A value that is an existing directory is a DIR even if it holds "=". More than one DIR, a name given
    twice, or a NAME=DIR whose directory does not exist is refused: one adapter can be merged into the
    weights, the others are served by name.
    """
    merged: str | None = None
    named: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or Path(value).is_dir():
            if merged is not None:
                raise NeojError(f"--adapter {value}: only one adapter can be merged into the model ({merged} is); "
                                "serve the others by name with --adapter NAME=DIR")
            merged = value
        elif name in named:
            raise NeojError(f"--adapter {value}: the name {name!r} is already given to {named[name]}")
        elif not Path(directory).is_dir():  # before a model is loaded, which may take minutes
            raise NeojError(f"--adapter {value}: no such adapter directory: {directory!r}")
        else:
            named[name] = directory
    return merged, named
