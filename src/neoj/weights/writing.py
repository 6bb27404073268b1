"""Writing checkpoints that transformers reads unchanged: safetensors files, whole or in bounded shards.

Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file that a later load would take for a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .loading import expected_tensors
from .names import neoj_to_hf_name
from ..model import Transformer


def state_dict_for_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Returns the model's weights under transformers' names (what save_pretrained would write)."""
    out = {}
    for name, tensor in expected_tensors(model).items():
        out[neoj_to_hf_name(name, model.config.model_type)] = tensor.detach().contiguous()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Writes `tensors` to the safetensors file `path` atomically (a crash never leaves a half-written file),
    readable as any other file the user writes: safetensors creates its files 0600, whatever the umask."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_checkpoint(model: Transformer, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads unchanged."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_hf(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_safetensors(tensors, directory / "model.safetensors")
    model.config.save(directory)


class ShardWriter:
    """Writes tensors into safetensors shards of bounded size, each atomically (temp file + rename).

    Memory stays near one shard whatever the model's size: tensors are added one at a time and a shard
    is written as soon as it is full.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Adds one tensor; writes the shard when it has reached the size limit."""
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        write_safetensors(self.pending, self.directory / name)
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self, metadata: dict) -> list[str]:
        """Writes what is left and, for several shards, the index; returns the files written."""
        self._flush()
        if len(self.shards) == 1:  # one shard: the plain file name every loader looks for first
            (self.directory / self.shards[0][0]).replace(self.directory / "model.safetensors")
            return ["model.safetensors"]
        index = {"metadata": metadata, "weight_map": {k: name for name, keys in self.shards for k in keys}}
        tmp = self.directory / "model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(self.directory / "model.safetensors.index.json")
        return [name for name, _ in self.shards] + ["model.safetensors.index.json"]
