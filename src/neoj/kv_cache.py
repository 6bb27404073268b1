"""A preallocated key/value cache written by position, so decode allocates nothing per token."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer: (layers, B, H, max_len, D), plus which slots hold real tokens."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        # Zeros, not empty: masked slots get zero weight, and 0 * garbage could still be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        self.padded = False  # set once any slot holds padding, so unpadded decode skips mask building

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """Returns an empty cache sized for `model` (a Transformer) and `max_len` tokens per row."""
        cfg = model.config
        w = model.wte.weight
        return cls(cfg.n_layers, batch, cfg.n_heads, cfg.head_dim, max_len, w.dtype, w.device)

    def mark_valid(self, start: int, valid: torch.Tensor | None, T: int) -> torch.Tensor:
        """Records which of the T new slots are real tokens; returns the validity of all slots."""
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot write {T} more at position {start}")
        if valid is not None:
            valid = valid[:, -T:]
            self.key_valid[:, start : start + T] = valid
            self.padded = self.padded or not bool(valid.all())
        return self.key_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, H, T, D) at `start`; returns all keys and values so far (B, H, start+T, D)."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps only the batch rows in `index` (used when finished rows leave a batch)."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]
        self.key_valid = self.key_valid[index]
