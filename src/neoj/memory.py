"""Memory planning: what a model needs per dtype and quantization, computed from its config alone.

load() checks the plan against free RAM (or VRAM) before reading any weight, so a model that cannot
fit is refused with the options that would fit, instead of being OOM-killed halfway through loading.

training_memory plans a training step the same way (weights, gradients, AdamW, activations); `neoj info MODEL
--train` prints it per mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .config import PRESETS, ModelConfig, load_config, preset
from .errors import NeojError
from .weights import RANDOM_PREFIX, download_config, local_model_dir

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # torch -> plan's
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
    return int(rest * bytes_per_param + _quantized_bytes(linears, quantize, group_size))


def _quantized_bytes(linears: list[tuple[int, int]], quantize: str, group_size: int) -> int:
    """Returns the bytes of (out, in) linear weights quantized with `quantize`."""
    if quantize == "int8":  # int8 values and one bf16 scale per output row
        return sum(o * i + 2 * o for o, i in linears)
    # two 4-bit values a byte, a bf16 scale and zero per group
    return sum(o * i // 2 + 4 * o * (i // group_size) for o, i in linears)


def block_weight_bytes(cfg: ModelConfig, bytes_per_param: float, quantize: str | None = None,
                       group_size: int = 128) -> int:
    """Returns the bytes of one block's weights; weight_bytes is n_layers of these plus the embeddings, final norm
    and head (what a device map keeps on its first device: neoj.placement sizes its split with both)."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    params = 4 * c * c + (c if cfg.out_proj_bias else 0) + 2 * c * i + i + c + (2 if cfg.parallel_block else 4) * c
    if quantize is None:
        return int(params * bytes_per_param)
    linears = [(c, c)] * 4 + [(i, c), (c, i)]  # q, k, v, out; fc_in, fc_out (as linear_shapes)
    rest = params - sum(o * n for o, n in linears)
    return int(rest * bytes_per_param + _quantized_bytes(linears, quantize, group_size))


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


def fitting_plans(cfg: ModelConfig, context: int | None, batch: int, group_size: int,
                  fits: Callable[[Plan], bool]) -> list[Plan]:
    """Returns the plans (dtypes and quantizations) for which fits(plan) holds, to suggest instead of one that does
    not fit. float16 is never suggested for GPT-Neo: its attention overflows fp16 (transformers #11076)."""
    return [p for p in plans(cfg, context, batch, group_size) if fits(p)
            and not (p.dtype == "float16" and not p.quantize and not cfg.rotary_dim)]


def check_fits(cfg: ModelConfig, chosen: Plan, available: int, device: str, name: str,
               context: int | None = None, batch: int = 1, group_size: int = 128) -> None:
    """Raises MemoryPlanError, naming what is needed and which options would fit, if `chosen` does not fit."""
    if chosen.needed_bytes <= available:
        return
    fits = fitting_plans(cfg, context, batch, group_size, lambda p: p.needed_bytes <= available)
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


# ---------------------------------------------------------------------------------------------------------
# Training

LORA_DROPOUT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out")
TRAINING_MODES = {  # label: (lora, autocast, grad_checkpointing)
    "full, fp32": (False, False, False),
    "full, bf16": (False, True, False),
    "full, bf16, checkpointing": (False, True, True),
    "LoRA, bf16": (True, True, False),
    "LoRA, bf16, checkpointing": (True, True, True),
}


def _lora_shapes(cfg: ModelConfig, targets) -> list[tuple[int, int]]:
    """Returns (in, out) of each LoRA-wrapped linear of one block."""
    c, i = cfg.hidden_size, cfg.intermediate_size
    dims = {"q_proj": (c, c), "k_proj": (c, c), "v_proj": (c, c), "out_proj": (c, c), "fc_in": (c, i),
            "fc_out": (i, c)}
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise NeojError(f"cannot plan LoRA on {unknown}; plannable targets: {', '.join(dims)}")
    return [dims[t] for t in targets]


def lora_parameters(cfg: ModelConfig, r: int = 8, targets=("q_proj", "v_proj")) -> int:
    """Returns the trainable parameters of rank-`r` adapters on `targets` in every block (A: r x in, B: out x r)."""
    return cfg.n_layers * sum(r * (i + o) for i, o in _lora_shapes(cfg, targets))


def activation_bytes_per_token(cfg: ModelConfig, *, lora: bool, autocast: bool, lora_r: int = 8,
                               lora_targets=("q_proj", "v_proj")) -> tuple[int, int]:
    """Returns (bytes per token per block, bytes per token outside the blocks) that autograd keeps for backward.

    Counted from what neoj's forward (neoj.model + neoj.train.loss) saves; tests/test_memory.py checks it
    against torch.autograd.graph.saved_tensors_hooks. h = hidden size, I = intermediate size, H = heads,
    rd = rotary dims. Per block, full fine-tune: GPT-Neo 32h + 8I (fp32) or 24h + 4I (bf16 autocast);
    GPT-J 24h + 8I or 20h + 4I + 4rd; plus the attention's logsumexp (4H) and LayerNorm statistics (8 each).
    Frozen linears keep no input, so LoRA's blocks keep less (GPT-Neo 24h + 4I / 16h + 2I, GPT-J 20h + 4I /
    12h + 2I + 4rd) plus, per adapted linear with input size d, its dropout and A's input and output:
    8d + 4r (fp32) or 6d + 2r (4d + 2r when the input is already bf16, as out_proj's and fc_out's are).
    Outside the blocks: the final LayerNorm's input and the loss's gradient of the hidden states
    (8h fp32, 6h bf16, + 24 bytes for GPT-Neo's or 16 + 4rd (fp32) for GPT-J's ids and rotary table);
    under LoRA the first block keeps less since its input needs no gradient (a negative term).
    """
    h, i, H, rd = cfg.hidden_size, cfg.intermediate_size, cfg.n_heads, cfg.rotary_dim
    j = cfg.parallel_block  # GPT-J's block: one LayerNorm, attention and MLP side by side
    ln = 8 if j else 16
    attn = 4 * H + ln
    if not lora:
        if autocast:
            layer = (20 * h + 4 * i + 4 * rd if j else 24 * h + 4 * i) + attn
        else:
            layer = (24 * h + 8 * i if j else 32 * h + 8 * i) + attn
        rest = (6 * h if autocast else 8 * h) + ((16 + (0 if autocast else 4 * rd)) if j else 24)
        return layer, rest
    if autocast:
        layer = (12 * h + 2 * i + 4 * rd if j else 16 * h + 2 * i) + attn
        rest = -10 * h - 2 * rd if j else -2 * h
    else:
        layer = (20 * h + 4 * i if j else 24 * h + 4 * i) + attn
        rest = -16 * h + 4 * rd if j else 0
    for name, (d, _) in zip(lora_targets, _lora_shapes(cfg, lora_targets)):
        if autocast:
            layer += (4 * d if name in ("out_proj", "fc_out") else 6 * d) + 2 * lora_r
        else:
            layer += 8 * d + 4 * lora_r
        # what the first block no longer keeps (measured; q_proj and out_proj change nothing)
        if name in ("k_proj", "v_proj"):
            rest -= 4 * h
        elif j and name == "fc_in":
            rest += 4 * h if autocast else 12 * h
        elif j and name == "fc_out" and "fc_in" not in lora_targets:
            rest -= 2 * i if autocast else 4 * i
    return layer, rest


def training_memory(cfg: ModelConfig, *, lora: bool, autocast: bool, grad_checkpointing: bool, batch: int,
                    seq_len: int, lora_r: int = 8, lora_targets=("q_proj", "v_proj")) -> dict:
    """Returns the bytes one training step of neoj needs: weights, gradients, optimizer, activations, loss, total.

    Closed-form from the config, for neoj's own training loop (neoj.train):
    - weights stay float32 whatever the autocast (bf16 autocast computes in bf16 and keeps fp32 master
      weights): 4 bytes per parameter; gradients 4 and AdamW's two fp32 states 8 per trainable parameter
      (all of them, or LoRA's A and B on `lora_targets` at rank `lora_r`);
    - activations: what autograd keeps for the backward pass, per token (activation_bytes_per_token) times
      batch x seq_len, plus, for a full fine-tune, the LM head's gradient that the fused loss
      (neoj.train.loss) computes in the forward pass and keeps (4 bytes per head parameter), and under bf16
      autocast the bf16 copy of every block's linear weights that the backward needs (2 bytes each).
      Attention is fused (scaled_dot_product_attention): nothing of size T x T is kept except GPT-Neo's
      boolean local-attention mask once seq_len exceeds its window;
    - with gradient checkpointing each block keeps only its fp32 input (4h per token) and one block's
      activations exist at a time (the trainable weights' bf16 copies stay in autocast's cache; frozen
      ones are made again per block: one block's worth);
    - the loss's transient: one chunk (neoj.train.loss.CHUNK_ROWS rows) of fp32 logits, and under bf16
      autocast its bf16 gradient and a bf16 copy of the head;
    - runtime: RUNTIME_BYTES (a GPU adds its CUDA context, about 0.5 GiB).
    An upper bound of the peak: activations are freed during the backward as gradients appear.
    """
    from .train.loss import CHUNK_ROWS  # torch is imported only when training is planned

    h, V, L = cfg.hidden_size, cfg.vocab_size, cfg.n_layers
    params = cfg.num_parameters()
    trainable = lora_parameters(cfg, lora_r, lora_targets) if lora else params
    tokens = batch * seq_len
    layer, rest = activation_bytes_per_token(cfg, lora=lora, autocast=autocast, lora_r=lora_r,
                                             lora_targets=lora_targets)
    block_linears = sum(o * i for o, i in linear_shapes(cfg)[:-1])  # every block's linear weights
    head = 0 if lora else 4 * V * (h + (1 if cfg.lm_head_bias else 0))
    copies = 2 * block_linears if autocast else 0  # bf16 copies of the blocks' weights, kept for backward
    if autocast and lora:
        copies += 2 * trainable  # and of the adapters' A and B
        # Block 0's input needs no gradient: the frozen linears fed by its first LayerNorm keep no bf16 copy,
        # nor do the A matrices there (GPT-J's MLP is fed by that LayerNorm too).
        shapes = dict(zip(("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
                          _lora_shapes(cfg, ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"))))
        first = ["q_proj", "k_proj", "v_proj"]
        if cfg.parallel_block:
            first += ["fc_in"] if "fc_in" in lora_targets else ["fc_in", "fc_out"]
        copies -= 2 * sum(shapes[n][0] * shapes[n][1] for n in first)
        copies -= 2 * sum(lora_r * shapes[n][0] for n in lora_targets if n in first)
    if grad_checkpointing:
        if lora:
            copies //= L
        acts = head + copies + tokens * (rest + L * 4 * h + layer)
    else:
        acts = head + copies + tokens * (rest + L * layer)
    if "local" in cfg.attention_layers and seq_len > cfg.window_size:
        acts += seq_len * seq_len  # the local-attention mask, one byte per query and key, shared by the blocks
    loss = CHUNK_ROWS * V * 4 + ((CHUNK_ROWS * V * 2 + V * h * 2) if autocast else 0)
    out = {"weights_bytes": 4 * params, "gradients_bytes": 4 * trainable, "optimizer_bytes": 8 * trainable,
           "activations_bytes": int(acts), "loss_bytes": loss, "runtime_bytes": RUNTIME_BYTES}
    out["total_bytes"] = sum(out.values())
    out["trainable_parameters"] = trainable
    return out


def training_table(cfg: ModelConfig, batch: int = 8, seq_len: int = 1024, lora_r: int = 8,
                   lora_targets=("q_proj", "v_proj")) -> list[dict]:
    """Returns training_memory for each mode of TRAINING_MODES, each row labelled with "mode"."""
    rows = []
    for label, (lora, autocast, ckpt) in TRAINING_MODES.items():
        row = training_memory(cfg, lora=lora, autocast=autocast, grad_checkpointing=ckpt, batch=batch,
                              seq_len=seq_len, lora_r=lora_r, lora_targets=lora_targets)
        rows.append({"mode": label, "lora": lora, "autocast": "bf16" if autocast else "off",
                     "grad_checkpointing": ckpt, **row})
    return rows
