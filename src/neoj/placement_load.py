"""Loading a placed model: load_placed builds it on the meta device and fills it with each tensor loaded straight
onto the device its Placement gives it (quantized there as it arrives, where asked), so no device ever holds the
whole model. neoj.placement decides the Placement; this module only follows it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import NeojError
from .model import Transformer
from .placement_map import Placement, block_runs
from .weights import build_meta, expected_tensors, fill_model, random_tensors, read_checkpoint, weight_files

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
        model.block_ranges = placement.ranges or block_runs(placement.blocks)
    return model.eval()
