"""`neoj quantize`: writing a quantized copy of a checkpoint, streaming, in neoj's quantized format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..weights.files import SIDE_FILES, weight_files
from ..weights.loading import build_meta, load_state_into
from ..weights.names import neoj_to_hf_name
from ..weights.writing import ShardWriter
from ..checks import clear_model_files, prepare_output_dir, same_directory
from ..config import load_config
from ..errors import NeojError
from .format import QUANTIZATION_FILE, QuantSpec, quantize_weight
from ..tokenizer import Tokenizer


def quantize_checkpoint(source: Path, out: Path, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16,
                        max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> list[str]:
    """Writes a quantized copy of the checkpoint in `source` to `out`, streaming; returns the files written.

    Non-linear tensors (embeddings, layer norms, biases) are stored in `dtype`. The source is read one
    tensor at a time, so memory stays near one shard of output plus the largest tensor. `out` must be
    new or empty unless `overwrite`, which deletes the model files already there (never `source`).
    """
    source, out = Path(source), Path(out)
    if QuantSpec.read(source) is not None:
        raise NeojError(f"{source} is already quantized; quantize the full-precision checkpoint instead")
    if same_directory(out, source):
        raise NeojError("--out must be a new directory, not the checkpoint being quantized")
    prepare_output_dir(out, overwrite=overwrite)
    cfg = load_config(source)
    files = weight_files(source)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_model_files(out)
    writer = ShardWriter(out, max_shard_bytes)

    def take(name: str, tensor: torch.Tensor) -> None:
        key = neoj_to_hf_name(name, cfg.model_type)
        if spec.quantizes(name):
            for part, t in quantize_weight(tensor, spec).items():
                writer.add(f"{key[: -len('.weight')]}.{part}", t)
        else:
            writer.add(key, tensor.to(dtype))
        if name == "wte.weight" and cfg.tie_word_embeddings:  # the tied head gets its own quantized copy
            for part, t in quantize_weight(tensor, spec).items():
                writer.add(f"lm_head.{part}", t)

    load_state_into(build_meta(cfg), files, dtype, torch.device("cpu"), transform=take)
    written = writer.close({"quantization": json.dumps(spec.to_dict())})
    _copy_side_files(source, out)
    (out / QUANTIZATION_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")  # last: marks it complete
    return written + [QUANTIZATION_FILE]


def _copy_side_files(source: Path, out: Path) -> None:
    """Copies config, tokenizer and generation files; writes the tokenizer where the source has none of its own."""
    for name in SIDE_FILES:
        if (source / name).exists() and name != QUANTIZATION_FILE:
            shutil.copyfile(source / name, out / name)
    if not (out / "tokenizer.json").exists() and not (out / "vocab.json").exists():
        Tokenizer.from_dir(source).save(out)
