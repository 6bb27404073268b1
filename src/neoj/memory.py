"""Memory planning: what a model needs per dtype and quantization, computed from its config alone.

load() checks the plan against free RAM (or VRAM) before reading any weight, so a model that cannot
fit is refused with the options that would fit, instead of being OOM-killed halfway through loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import PRESETS, ModelConfig, load_config, preset
from .errors import NeojError
from .weights import RANDOM_PREFIX, download_config, local_model_dir

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}
# The Python runtime, torch's libraries and one tensor being converted while loading.
RUNTIME_BYTES = 600 << 20
GIB = 1 << 30


class MemoryPlanError(NeojError, MemoryError):
    """The model would not fit in the memory available on its device."""


def resolve_config(name: str | None, revision: str | None = None) -> tuple[ModelConfig, str]:
    """Returns (config, where it came from) for a preset name, random:PRESET, local directory, builtin or Hub id.

    Reads config.json only (for a Hub id: from the cache, or fetched alone). Names resolve as everywhere
    else in neoj (see neoj.weights.local_model_dir), plus bare preset names such as gpt-j-6b; a directory
    wins over a preset of the same name only when it is written as a path (./gpt-j-6b).
    """
    if name is not None and name.lower() in PRESETS:
        return preset(name), f"preset {name.lower()}"
    if name is not None and name.startswith(RANDOM_PREFIX):
        return preset(name[len(RANDOM_PREFIX):]), f"preset {name[len(RANDOM_PREFIX):].lower()}"
    local = local_model_dir(name)
    if local is not None:
        return load_config(local), str(local)
    return load_config(download_config(name, revision=revision)), name


def linear_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Returns (out, in) of every layer quantization touches: each block's linears and the LM head."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    return [(c, c)] * 4 * cfg.n_layers + [(i, c), (c, i)] * cfg.n_layers + [(cfg.vocab_size, c)]


def weight_bytes(cfg: ModelConfig, bytes_per_param: float, quantize: str | None = None,
                 group_size: int = 128) -> int:
    """Returns the bytes of all weights: `bytes_per_param` each, or quantized linears plus the rest."""
    if quantize is None:
        return int(cfg.num_parameters() * bytes_per_param)
    linears = linear_shapes(cfg)
    linear_params = sum(o * i for o, i in linears)
    head_tied = cfg.tie_word_embeddings  # the tied head is counted once in num_parameters, as the embedding
    rest = cfg.num_parameters() - linear_params + (cfg.vocab_size * cfg.hidden_size if head_tied else 0)
    if quantize == "int8":  # int8 values and one bf16 scale per output row
        q = sum(o * i + 2 * o for o, i in linears)
    else:  # two 4-bit values a byte, a bf16 scale and zero per group
        q = sum(o * i // 2 + 4 * o * (i // group_size) for o, i in linears)
    return int(rest * bytes_per_param + q)


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int, bytes_per_value: int) -> int:
    """Returns the bytes of a KV cache holding `context` tokens for `batch` sequences."""
    return 2 * cfg.n_layers * batch * context * cfg.hidden_size * bytes_per_value


@dataclass
class Plan:
    """The memory a configuration needs: weights, KV cache, and the runtime around them."""

    label: str
    dtype: str
    quantize: str | None
    weights_bytes: int
    kv_cache_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes

    @property
    def needed_bytes(self) -> int:
        return self.total_bytes + RUNTIME_BYTES

    def option(self) -> str:
        """Returns the command-line flags that select this configuration."""
        return f"--quantize {self.quantize}" if self.quantize else f"--dtype {self.dtype}"

    def as_row(self) -> dict:
        return {"dtype": self.label, "weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "total_bytes": self.total_bytes}


def plan(cfg: ModelConfig, dtype: str, quantize: str | None = None, context: int | None = None, batch: int = 1,
         group_size: int = 128) -> Plan:
    """Returns the memory plan of `cfg` computed in `dtype` (activations, KV cache, unquantized weights)."""
    size = BYTES_PER_DTYPE[dtype]
    context = min(context or cfg.n_positions, cfg.n_positions)
    label = f"{quantize} ({dtype})" if quantize else dtype
    return Plan(label, dtype, quantize, weight_bytes(cfg, size, quantize, group_size),
                kv_cache_bytes(cfg, context, batch, size))


def plans(cfg: ModelConfig, context: int | None = None, batch: int = 1, group_size: int = 128) -> list[Plan]:
    """Returns the plans of every dtype, then int8 and int4 (computing in bfloat16)."""
    out = [plan(cfg, d, None, context, batch) for d in BYTES_PER_DTYPE]
    return out + [plan(cfg, "bfloat16", q, context, batch, group_size) for q in ("int8", "int4")]


def memory_table(cfg: ModelConfig, context: int = 2048, batch: int = 1, group_size: int = 128) -> list[dict]:
    """Returns one row per dtype and quantization: weights, KV cache and total bytes."""
    return [p.as_row() for p in plans(cfg, context, batch, group_size)]


def memory_limit(available: int) -> int:
    """Returns the bytes the planner may use: NEOJ_MEMORY_LIMIT (e.g. "8GB", "6GiB", bytes) or `available`."""
    raw = os.environ.get("NEOJ_MEMORY_LIMIT")
    if not raw:
        return available
    text = raw.strip().upper().replace(" ", "")
    units = {"TIB": 1 << 40, "GIB": GIB, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            text, mult = text[: -len(unit)], scale
            break
    else:
        mult = 1
    try:
        return int(float(text) * mult)
    except ValueError as exc:
        raise NeojError(f"NEOJ_MEMORY_LIMIT={raw!r} is not a size; write it like 8GB or 6GiB") from exc


def check_fits(cfg: ModelConfig, chosen: Plan, available: int, device: str, name: str,
               context: int | None = None, batch: int = 1, group_size: int = 128) -> None:
    """Raises MemoryPlanError, naming what is needed and which options would fit, if `chosen` does not fit."""
    if chosen.needed_bytes <= available:
        return
    # float16 is never suggested for GPT-Neo: its attention overflows fp16 (transformers #11076).
    fits = [p for p in plans(cfg, context, batch, group_size) if p.needed_bytes <= available
            and not (p.dtype == "float16" and not p.quantize and not cfg.rotary_dim)]
    ctx = min(context or cfg.n_positions, cfg.n_positions)
    msg = (f"{name} needs about {chosen.needed_bytes / GIB:.1f} GiB in {chosen.label} (weights "
           f"{chosen.weights_bytes / GIB:.1f} GiB, KV cache {chosen.kv_cache_bytes / GIB:.1f} GiB for {batch} x "
           f"{ctx} tokens, runtime {RUNTIME_BYTES / GIB:.1f} GiB) but only {available / GIB:.1f} GiB is available "
           f"on {device}. ")
    if fits:
        msg += "These would fit: " + ", ".join(f"{p.option()} ({p.needed_bytes / GIB:.1f} GiB)" for p in fits) + "."
    else:
        msg += "No dtype or quantization fits; free memory or use a machine with more."
    raise MemoryPlanError(msg + " (check_memory=False / --no-memory-check loads anyway.)")
