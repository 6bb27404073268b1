"""Loading quantized: quantize a full-precision checkpoint while it streams in, or read a quantized one.

Both ride on the one loader (neoj.weights.loading.fill_model), which checks every tensor's name and shape:
- StreamingQuantizer is a transform: each linear weight is quantized as it arrives (in row blocks where
  the reader streams rows), so only one full-precision tensor exists at a time;
- read_quantized is a reader of neoj's quantized checkpoints: it gathers each layer's parts (qweight,
  scales, mins) into one QuantizedLayer, which the loader checks and puts in place as a QuantLinear.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from ..weights.files import weight_files
from ..weights.loading import build_meta, expected_tensors, fill_model
from ..weights.names import hf_to_neoj_name
from ..weights.readers import RowSink, StoredTensor, map_safetensors
from ..errors import CheckpointError, NeojError
from .malloc import return_freed_memory_promptly, trim_heap
from .format import QuantSpec, check_parts, quantize_weight
from .layer import QuantLinear, replace_linear

# A part of a quantized layer in a checkpoint: MODULE.qweight, MODULE.scales or MODULE.mins.
_PART = re.compile(r"^(.*)\.(qweight|scales|mins)$")


def put_quantized(model: nn.Module, name: str, parts: dict[str, torch.Tensor], spec: QuantSpec,
                  device: torch.device) -> None:
    """Puts a QuantLinear made of `parts` in place of the linear layer whose weight is `name` (keeping its bias)."""
    module_name = name[: -len(".weight")]
    old = model.get_submodule(module_name)
    replace_linear(model, module_name, QuantLinear(parts, spec, old.bias, device))


class StreamingQuantizer:
    """A fill_model transform that quantizes each linear weight as it arrives.

    Only one full-precision tensor exists at a time: the model is never whole in full precision.
    Call finish(model) after loading to quantize a head tied to the embedding.
    """

    def __init__(self, model: nn.Module, spec: QuantSpec, dtype: torch.dtype, device: torch.device):
        self.model, self.spec, self.dtype, self.device = model, spec, dtype, torch.device(device)
        self.tied_head: QuantLinear | None = None
        return_freed_memory_promptly()

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if name == "wte.weight" and self.model.config.tie_word_embeddings:
            # The head tied to the embedding is quantized from the checkpoint's values, as `neoj quantize` does.
            self.tied_head = QuantLinear(quantize_weight(tensor, self.spec), self.spec, None, self.device)
        if not self.spec.quantizes(name):
            return tensor.to(device=self.device, dtype=self.dtype)
        put_quantized(self.model, name, quantize_weight(tensor, self.spec), self.spec, self.device)
        return None

    def row_sink(self, name: str, shape: tuple) -> RowSink | None:
        """Quantizes a linear weight block by block as it is read (fill_model's RowSink hook).

        Rows are quantized independently (per-row scales, per-row groups), so this gives exactly what
        quantizing the whole tensor would, without holding it in full precision.
        """
        if not self.spec.quantizes(name) or len(shape) != 2:
            return None
        parts: dict[str, torch.Tensor] = {}

        def take(start: int, rows: torch.Tensor) -> None:
            for key, part in quantize_weight(rows, self.spec).items():
                if key not in parts:
                    parts[key] = torch.empty((shape[0], *part.shape[1:]), dtype=part.dtype)
                parts[key][start : start + part.shape[0]] = part

        return RowSink(take, lambda: put_quantized(self.model, name, parts, self.spec, self.device))

    def finish(self, model: nn.Module) -> nn.Module:
        """Puts the quantized copy of a head tied to the embedding in place; returns the model."""
        if isinstance(model.lm_head, nn.Linear):
            if self.tied_head is None:
                raise NeojError("internal: the tied LM head was never quantized")
            model.lm_head = self.tied_head
        trim_heap()
        return model


class QuantizedLayer(StoredTensor):
    """A quantized linear weight of a checkpoint: its parts, gathered from wherever they lie (any shard).

    It stands for MODULE.weight: it fits a weight of shape (out, in) when check_parts says so, and
    reads as its parts {"qweight", "scales"[, "mins"]}, which PutQuantized turns into a QuantLinear.
    """

    def __init__(self, module: str, spec: QuantSpec):
        super().__init__(f"{module}.weight", torch.int8 if spec.scheme == "int8" else torch.uint8, (), None)
        self.module, self.spec = module, spec
        self.parts: dict[str, torch.Tensor] = {}
        self.sources: list[StoredTensor] = []

    def add(self, part: str, stored: StoredTensor) -> None:
        """Reads one part (qweight, scales or mins) into the layer."""
        self.parts[part] = stored.read()
        self.sources.append(stored)

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.sources)

    def check_fits(self, want: tuple) -> None:
        check_parts(self.module, self.parts, want, self.spec)

    def read(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self.parts


def read_quantized(files: Iterable[Path], spec: QuantSpec) -> Iterator[StoredTensor]:
    """Yields a quantized checkpoint's tensors: full-precision ones as they come (memory-mapped), then
    each quantized layer with its parts gathered. Parts of a layer the spec does not quantize are
    passed on as they are, for the loader to report as unused."""
    layers: dict[str, QuantizedLayer] = {}
    for file in files:
        for stored in map_safetensors(file):
            m = _PART.match(stored.key)
            if m and spec.quantizes(hf_to_neoj_name(m.group(1) + ".weight")):
                if m.group(1) not in layers:
                    layers[m.group(1)] = QuantizedLayer(m.group(1), spec)
                layers[m.group(1)].add(m.group(2), stored)
            elif not m and spec.quantizes(hf_to_neoj_name(stored.key)):
                raise CheckpointError(f"{file}: tensor {stored.key!r} should not be in this {spec.scheme} checkpoint: "
                                      "its layer is stored quantized (as .qweight and .scales)")
            else:
                yield stored
    yield from layers.values()


class PutQuantized:
    """The fill_model transform for quantized checkpoints: layers become QuantLinear, the rest is converted."""

    def __init__(self, model: nn.Module, spec: QuantSpec, dtype: torch.dtype, device: torch.device):
        self.model, self.spec, self.dtype, self.device = model, spec, dtype, device

    def __call__(self, name: str, value) -> torch.Tensor | None:
        if isinstance(value, dict):  # a QuantizedLayer's parts
            put_quantized(self.model, name, value, self.spec, self.device)
            return None
        return value.to(device=self.device, dtype=self.dtype)


def load_quantized(directory: Path, spec: QuantSpec, dtype: torch.dtype, device: torch.device, cfg) -> nn.Module:
    """Returns the model of a quantized checkpoint (as `neoj quantize` writes it), ready to run."""
    device = torch.device(device)
    files = weight_files(directory)
    if any(f.suffix != ".safetensors" for f in files):
        raise CheckpointError(f"{directory}: a quantized checkpoint must be safetensors")
    model = build_meta(cfg)
    expected = expected_tensors(model)
    if cfg.tie_word_embeddings:  # a head tied to the embedding has its own quantized copy
        expected["lm_head.weight"] = model.lm_head.weight
    fill_model(model, read_quantized(files, spec), dtype, device, PutQuantized(model, spec, dtype, device), expected)
    return model.eval()
