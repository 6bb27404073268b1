"""Which files make a checkpoint directory: its weight files (one format, maybe sharded) and side files."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

# In order of preference: safetensors (read without unpickling, mappable) before PyTorch's .bin.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Files a model directory needs besides its weights (tokenizer files are optional: GPT-2's are shipped).
SIDE_FILES = ["config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "quantization.json"]


def weight_files(directory: Path) -> list[Path]:
    """Returns the checkpoint's weight files, preferring safetensors, following shard indexes."""
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.exists():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{file} is not a valid shard index (needs a 'weight_map' object)") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(f"{file} names shards that are not in {directory}: {', '.join(missing)}")
        return [directory / s for s in shards]
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")
