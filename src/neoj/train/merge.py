"""`neoj merge`: fold a LoRA adapter into its base model and write a plain checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checks import clear_model_files, prepare_output_dir, same_directory
from ..config import load_config
from ..errors import NeojError
from ..weights import load_model, read_safetensors_header, resolve_model_dir, weight_files
from .checkpoint import copy_tokenizer, export_hf
from .lora import check_adapter, load_adapter, merge

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(directory: Path) -> torch.dtype:
    """Returns the dtype a checkpoint's weights are stored in (float32 when it cannot tell)."""
    file = weight_files(directory)[0]
    if file.suffix == ".safetensors":
        header, _ = read_safetensors_header(file)
        for entry in header.values():
            return _ST_DTYPES.get(entry["dtype"], torch.float32)
    return torch.float32


def merge_adapter(base: str, adapter: str, out: str, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Writes `base` with the LoRA `adapter` merged in to `out` (in fp32 arithmetic); returns `out`.

    `out` is checked before anything is loaded: it must be new or empty unless `overwrite`, which then
    deletes the model files in it once the merge has succeeded, just before writing. It is never the
    base model or the adapter itself.
    """
    out_dir = prepare_output_dir(out, overwrite=overwrite)
    source = resolve_model_dir(base)
    for what, path in (("base model", source), ("adapter", adapter)):
        if same_directory(path, out_dir):
            raise NeojError(f"--out {out} is the {what}; write the merged model to a new directory")
    check_adapter(adapter, load_config(source), base)  # a mismatch is refused before the base is read
    model = load_model(source, torch.float32, "cpu")
    load_adapter(model, adapter, base)
    merge(model)
    if overwrite:
        clear_model_files(out_dir)
    target = _DTYPES[dtype] if dtype else stored_dtype(source)
    state = {n: p for n, p in model.state_dict().items()}
    export_hf(state, model.config, out_dir, target)
    copy_tokenizer(source, out_dir)
    log.info("merged %s into %s -> %s (%s)", adapter, source, out_dir, target)
    return out_dir
