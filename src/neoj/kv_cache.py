"""A preallocated key/value cache written by position, so decode allocates nothing per token."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer: (layers, B, H, max_len, D), plus which slots hold real tokens."""

    # Set by a graphed decode step (neoj.cuda_graph): the slot written next, as a (1,) device tensor.
    # Then every shape is fixed, as a CUDA graph needs: writes go to `slot`, attention reads all
    # max_len slots and masks the ones past it.
    slot: torch.Tensor | None = None

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        # Zeros, not empty: masked slots get zero weight, and 0 * garbage could still be NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        # Each slot's token position. Slots are in position order within a row, but a row may skip slots
        # (left padding, a speculative step's rejected tokens), so local-window distances are measured here.
        self.key_pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0
        self.padded = False  # set once any slot holds padding, so unpadded decode skips mask building

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """Returns an empty cache sized for `model` (a Transformer) and `max_len` tokens per row."""
        cfg = model.config
        w = model.wte.weight
        return cls(cfg.n_layers, batch, cfg.n_heads, cfg.head_dim, max_len, w.dtype, w.device)

    def mark_valid(self, start: int, valid: torch.Tensor | None, T: int, positions: torch.Tensor) -> torch.Tensor:
        """Records which of the T new slots are real tokens and their positions (B, T); returns the validity
        of all slots."""
        if self.slot is not None:
            self.key_pos.index_copy_(1, self.slot, positions[:, -1:])
            return self.key_valid
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot write {T} more at position {start}")
        self.key_pos[:, start : start + T] = positions
        if valid is not None:
            valid = valid[:, -T:]
            self.key_valid[:, start : start + T] = valid
            self.padded = self.padded or not bool(valid.all())
        return self.key_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v (B, H, T, D) at `start`; returns all keys and values so far (B, H, start+T, D)."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def static_masks(self, window: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the (B, 1, 1, max_len) global and local masks of a one-token step writing at `slot`, for
        queries at `positions` (B, 1): real tokens up to the slot, and for local layers only those fewer
        than `window` positions back."""
        seen = self.key_valid & (torch.arange(self.max_len, device=self.k.device) <= self.slot)
        near = (positions - self.key_pos) < window
        return seen[:, None, None], (seen & near)[:, None, None]
