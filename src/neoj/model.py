"""One decoder-only transformer for GPT-Neo and GPT-J, branching only on ModelConfig fields.

Shapes: B batch, T new tokens, L keys visible (cache length), H heads, D head_dim, C hidden size.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig
from .kv_cache import KVCache


def activation_fn(name: str):
    """Returns the elementwise activation for a config's activation_function."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}[name]


def rotary_table(n_positions: int, rotary_dim: int) -> torch.Tensor:
    """Returns (n_positions, rotary_dim // 2, 2) cos/sin, computed in fp32 exactly as GPT-J's reference."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    angles = torch.arange(n_positions, dtype=torch.int64).float()[:, None] * inv_freq
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotates pairs (0,1), (2,3), ... of the first rotary_dim dims of x (B, T, H, D); the rest pass through.

    Each pair is a complex number e + i*o multiplied by cos + i*sin, in fp32 (as the reference computes
    it, whatever the model's dtype), then rounded to x's dtype: four kernels instead of a dozen, which
    matters when a decode step is hundreds of small kernels.
    """
    pairs = torch.view_as_complex(x[..., :rotary_dim].float().unflatten(-1, (-1, 2)))  # (B, T, H, rd/2)
    rotated = torch.view_as_real(pairs * torch.view_as_complex(cos_sin.float())).flatten(-2).to(x.dtype)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1) if x.shape[-1] > rotary_dim else rotated


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Returns the dtype attention's inputs are given in: fp32, as the reference computes scores and
    softmax, except bf16 on CUDA. There SDPA's kernels already multiply and softmax in fp32 (exact on bf16
    inputs, and bf16 has fp32's range), so fp32 copies of q and the cache would only cost three kernels a
    layer and twice the reads. fp16 always goes to fp32: GPT-Neo's unscaled scores overflow it."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cuda"):
        return dtype
    return torch.float32


# Attention kernels for CUDA calls whose shapes change every call (eager decode, prefill): cuDNN's builds a
# plan per new key length (tens of milliseconds each; BENCHMARKS.md, GPU decode, "no CUDA graph" rows), the
# others do not. A graphed step has one shape and may use any.
_VARYING_SHAPE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device, fixed_shape: bool):
    """Returns the context choosing SDPA's kernels: everything PyTorch would pick, except cuDNN's for
    CUDA calls whose shapes vary."""
    if device.type != "cuda" or fixed_shape:
        return contextlib.nullcontext()
    return sdpa_kernel(_VARYING_SHAPE_BACKENDS)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Returns 0 where `allowed`, -inf elsewhere: the form SDPA would convert a boolean mask to on every
    layer, made once per step instead."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class Attention(nn.Module):
    """Multi-head causal self-attention, global or sliding-window, with optional rotary q/k."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        c = cfg.hidden_size
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.is_local = cfg.attention_layers[layer_idx] == "local"
        self.scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn else 1.0
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.out_proj = nn.Linear(c, c, bias=cfg.out_proj_bias)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim)
        if self.rotary_dim:
            q = apply_rotary(q, ctx.cos_sin, self.rotary_dim)
            k = apply_rotary(k, ctx.cos_sin, self.rotary_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, ctx.start)  # (B, H, L, D)
        mask, is_causal = ctx.local_mask if self.is_local else ctx.global_mask
        if ctx.is_local_slice and self.is_local:
            # Decoding past the window: a local layer only needs its last window_size keys.
            k, v = k[:, :, -ctx.window :], v[:, :, -ctx.window :]
        dtype = q.dtype
        compute = attention_dtype(dtype, q.device)
        if compute != dtype:
            q, k, v = q.to(compute), k.to(compute), v.to(compute)
        with attention_backends(q.device, ctx.fixed_shape):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)
        # One copy; width n_heads * head_dim, which is C unless tensor parallelism gave this rank fewer heads.
        y = y.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format).view(B, T, -1)
        return self.out_proj(y)


class MLP(nn.Module):
    """fc_in -> activation -> fc_out, both with biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """A transformer layer: sequential pre-LN (GPT-Neo) or parallel attention + MLP (GPT-J)."""

    # Tensor parallelism sets `reduce` (an all-reduce over the ranks, neoj.tensor_parallel): each rank's attention
    # and MLP then give partial sums of the branch outputs, summed here before the residual.
    reduce = None

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = None if self.parallel else nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        h = self.ln_1(x)
        reduce = self.reduce
        if self.parallel:  # GPT-J: one LayerNorm feeds both branches (and under tensor parallelism, one all-reduce)
            return (self.attn(h, ctx) + self.mlp(h) if reduce is None else reduce(self.attn(h, ctx) + self.mlp(h))) + x
        a = self.attn(h, ctx)  # GPT-Neo: attention, then MLP on the updated stream
        x = x + (a if reduce is None else reduce(a))
        m = self.mlp(self.ln_2(x))
        return x + (m if reduce is None else reduce(m))


class ForwardContext:
    """Per-call state shared by all layers: positions, masks and the cache slot being written."""

    __slots__ = ("cache", "start", "cos_sin", "global_mask", "local_mask", "is_local_slice", "window", "fixed_shape",
                 "device", "_copies")

    def __init__(self, cfg: ModelConfig, T: int, positions: torch.Tensor, cache: KVCache | None,
                 key_valid: torch.Tensor | None, rope: torch.Tensor | None):
        self.cache = cache
        self.start = cache.length if cache is not None else 0
        self.window = cfg.window_size
        self.cos_sin = rope[positions].unsqueeze(2) if rope is not None else None  # (B, T, 1, rd/2, 2)
        self.is_local_slice = False
        self.device = positions.device  # where the masks and rotary angles are
        self._copies: dict = {}
        self.fixed_shape = cache is not None and cache.slot is not None
        if self.fixed_shape:  # a graphed decode step: masks from the slot tensor
            cache.mark_valid(self.start, None, T, positions)
            global_mask, local_mask = cache.static_masks(self.window, positions)
            dtype = attention_dtype(cache.k.dtype, cache.k.device)
            self.global_mask = (additive_mask(global_mask, dtype), False)
            self.local_mask = (additive_mask(local_mask, dtype), False)
            return
        L = self.start + T
        key_pos = positions
        if cache is not None:
            key_valid = cache.mark_valid(self.start, key_valid, T, positions)
            padded, key_pos = cache.padded, cache.key_pos[:, :L]
        else:
            padded = key_valid is not None and not bool(key_valid.all())
        if not padded and T == 1:
            # Decoding one token with no padding: every key so far is visible to a global layer.
            self.global_mask = (None, False)
            self.is_local_slice = L > self.window
            self.local_mask = (None, False)
        elif not padded and self.start == 0:
            self.global_mask = (None, True)
            self.local_mask = (None, True) if T <= self.window else \
                (self._mask(T, L, None, None, positions, True), False)
        else:
            valid = key_valid[:, :L] if padded else None
            self.global_mask = (self._mask(T, L, valid, None, positions, local=False), False)
            self.local_mask = (self._mask(T, L, valid, key_pos if padded else None, positions, local=True), False)

    def on(self, device: torch.device) -> "ForwardContext":
        """Returns this context with its masks and rotary angles on `device` (made once per device per call), for
        the layers a device map placed there."""
        if device == self.device:
            return self
        copy = self._copies.get(device)
        if copy is None:
            copy = ForwardContext.__new__(ForwardContext)
            for name in self.__slots__:
                setattr(copy, name, getattr(self, name))
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
            copy.device, copy.cos_sin = device, move(self.cos_sin)
            copy.global_mask = (move(self.global_mask[0]), self.global_mask[1])
            copy.local_mask = (move(self.local_mask[0]), self.local_mask[1])
            copy._copies = self._copies
            self._copies[device] = copy
        return copy

    def _mask(self, T: int, L: int, valid: torch.Tensor | None, key_pos: torch.Tensor | None,
              positions: torch.Tensor, local: bool):
        """Returns a boolean mask (B or 1, 1, T, L), True where a query may attend to a key.

        A local layer's query sees keys fewer than window positions back. With key_pos (B, L) given (a row
        that skips slots: padding, rolled-back speculation) the distance is measured in positions; else
        slot distance is token distance.
        """
        device = positions.device
        q_idx = torch.arange(self.start, self.start + T, device=device)[:, None]
        k_idx = torch.arange(L, device=device)[None, :]
        allowed = (k_idx <= q_idx)[None]
        if local and key_pos is not None:
            allowed = allowed & (positions[:, :, None] - key_pos[:, None, :] < self.window)
        elif local:
            # Query i sees keys j with 0 <= i - j < window: itself and the window - 1 before it.
            allowed = allowed & (q_idx - k_idx < self.window)[None]
        if valid is None:
            return allowed[:, None]
        # A padding query sees only itself, so its row is never empty (an empty row would give NaN).
        return ((allowed & valid[:, None, :]) | (k_idx == q_idx)[None])[:, None]


class Transformer(nn.Module):
    """GPT-Neo / GPT-J decoder: token ids in, final hidden states or logits out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.hidden_size) if cfg.learned_positions else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.tie_weights()
        # A device map (neoj.placement) puts block i on block_devices[i]; the embeddings, final norm and head stay on
        # the embedding's device. None: every block is there too.
        self.block_devices: list[torch.device] | None = None
        # The device map's layer ranges (set with block_devices by neoj.placement.load_placed): the KV cache keeps one
        # piece per range, even where two ranges share a device (neoj.kv_cache.cache_pieces).
        self.block_ranges: tuple[range, ...] | None = None
        self.register_buffer("rope", None, persistent=False)
        if cfg.rotary_dim and self.wte.weight.device.type != "meta":
            self.init_buffers()

    def tie_weights(self) -> None:
        """Shares the LM head with the token embedding where the config ties them."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not a quantized head
            self.lm_head.weight = self.wte.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Computes the non-persistent rotary table (after building on the meta device)."""
        if self.config.rotary_dim:
            device = device or self.wte.weight.device
            self.rope = rotary_table(self.config.n_positions, self.config.rotary_dim).to(device)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the rotary table with the weights; rotary runs in fp32 (as
        # the reference), so the table is made again in fp32 instead.
        super()._apply(fn, recurse)
        if self.rope is not None and self.rope.dtype != torch.float32:
            self.init_buffers(self.rope.device)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Returns final hidden states (B, T, C) for input_ids (B, T).

        positions (B, T) default to 0..T-1 after what the cache holds; key_valid (B, T) marks real
        tokens (False for left padding).
        """
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        ctx = ForwardContext(self.config, T, positions, cache, key_valid, self.rope)
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        if self.block_devices is None:
            for block in self.blocks:
                x = block(x, ctx)
        else:
            x = self._placed_blocks(x, ctx)
        if cache is not None and cache.slot is None:  # a graphed step advances its own cache (replays skip this)
            cache.length += T
        return self.ln_f(x)

    def _placed_blocks(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Runs the blocks on the devices of the device map: activations move once per boundary, and back."""
        home = x.device
        for block, device in zip(self.blocks, self.block_devices):
            if x.device != device:
                x = x.to(device)
            x = block(x, ctx.on(device))
        return x.to(home)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Returns fp32 next-token logits for hidden states (..., C)."""
        return self.lm_head(hidden).float()

    def num_parameters(self) -> int:
        """Returns the number of distinct parameters."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def positions_from_valid(key_valid: torch.Tensor) -> torch.Tensor:
    """Returns position ids (B, T) that count only real tokens, for left-padded rows."""
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)
