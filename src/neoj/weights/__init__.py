"""Checkpoints, in one import: find a model, read its tensors, fill the model, write checkpoints.

The work is done in small modules, layered one way (each imports only modules listed before it):
- names: transformers' tensor names <-> neoj's;
- files: which files of a directory are its weights (safetensors first, shard indexes);
- hub, resolution: what a model name means (a directory, builtin, random:PRESET, a Hub id) and
  fetching a Hub model into the Hugging Face cache;
- readers: each format's file as a stream of tensors read only when asked;
- loading: the one function that fills a meta-device model from such a stream (and says
  which tensors are missing, unused or misshaped), for checkpoints and random weights alike;
- writing: safetensors files and shards that transformers loads unchanged.
This module re-exports their public names, so `from neoj.weights import ...` keeps working.
"""

from __future__ import annotations

from .files import SIDE_FILES, WEIGHT_FILES, weight_files
from .loading import (assign_tensor, build_meta, expected_tensors, fill_model, load_model, load_state_into,
                                 random_model, random_tensors)
from .names import UNUSED_BUFFERS, hf_to_neoj_name, neoj_to_hf_name
from .readers import (SAFETENSORS_DTYPES, RowSink, StoredTensor, map_safetensors, read_checkpoint,
                                 read_safetensors, read_safetensors_header, read_torch_bin)
from .writing import ShardWriter, save_checkpoint, state_dict_for_hf, write_safetensors
from .hub import download, download_config, hub_id_problem
from .resolution import (BUILTIN_NAME, RANDOM_PREFIX, builtin_model_dir, local_model_dir, looks_like_path,
                               model_forms, resolve_model_dir)

__all__ = [
    "BUILTIN_NAME", "RANDOM_PREFIX", "SAFETENSORS_DTYPES", "SIDE_FILES", "UNUSED_BUFFERS", "WEIGHT_FILES", "RowSink",
    "ShardWriter", "StoredTensor", "assign_tensor", "build_meta", "builtin_model_dir", "download", "download_config",
    "expected_tensors", "fill_model", "hf_to_neoj_name", "hub_id_problem", "load_model", "load_state_into",
    "local_model_dir", "looks_like_path", "map_safetensors", "model_forms", "neoj_to_hf_name", "random_model",
    "random_tensors", "read_checkpoint", "read_safetensors", "read_safetensors_header", "read_torch_bin",
    "resolve_model_dir", "save_checkpoint", "state_dict_for_hf", "weight_files", "write_safetensors",
]
