"""Memory planning: what a model needs per dtype, computed from its config alone."""

from __future__ import annotations

from pathlib import Path

from .config import PRESETS, ModelConfig, load_config, preset
from .errors import CheckpointError

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_config(name: str, revision: str | None = None) -> tuple[ModelConfig, str]:
    """Returns (config, where it came from) for a preset name, local directory or Hub id (config.json only)."""
    if name in PRESETS:
        return preset(name), f"preset {name}"
    if name.startswith("random:") and name[7:] in PRESETS:
        return preset(name[7:]), f"preset {name[7:]}"
    path = Path(name).expanduser()
    if path.exists():
        return load_config(path), str(path)
    if name.count("/") != 1:
        raise CheckpointError(f"{name!r} is not a preset ({', '.join(PRESETS)}), a directory, or a Hub id")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        file = hf_hub_download(name, "config.json", revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"could not get config.json of {name!r} from the Hub or the local cache: {exc}") from exc
    return load_config(file), name


def weight_bytes(cfg: ModelConfig, bytes_per_param: float) -> int:
    """Returns the bytes of all weights at `bytes_per_param`."""
    return int(cfg.num_parameters() * bytes_per_param)


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int, bytes_per_value: int) -> int:
    """Returns the bytes of a KV cache holding `context` tokens for `batch` sequences."""
    return 2 * cfg.n_layers * batch * context * cfg.hidden_size * bytes_per_value


def memory_table(cfg: ModelConfig, context: int = 2048, batch: int = 1) -> list[dict]:
    """Returns one row per dtype: weights, KV cache and total bytes."""
    rows = []
    for dtype, size in BYTES_PER_DTYPE.items():
        w = weight_bytes(cfg, size)
        kv = kv_cache_bytes(cfg, context, batch, size)
        rows.append({"dtype": dtype, "weights_bytes": w, "kv_cache_bytes": kv, "total_bytes": w + kv})
    return rows
