"""A preallocated key/value cache written by position, so decode allocates nothing per token.

A model whose layers a device map placed across devices (neoj.placement) keeps each layer's keys and values on its
layer's device: the cache's k and v are then LayerSplits, one stacked piece per run of consecutive layers, indexed
like the one tensor they stand for.
"""

from __future__ import annotations

from typing import Sequence

import torch


class LayerSplit:
    """A (layers, ...) cache tensor stored as pieces of consecutive layers, each on its own device.

    It takes exactly the indexing the cache's users do, so they need not know: x[layer] and x[layer, ...] give
    that layer's part of its piece (a plain tensor, on the layer's device); x[:, ...] gives a LayerSplit of each
    piece's view; x[:, ...] = value writes each piece its part of a LayerSplit or stacked tensor (moved to the
    piece's device); clone, gather along another dim, and torch.stack / torch.cat of LayerSplits (the prefix
    cache's blocks) work piece by piece. `layer_dim` says which dim holds the layers (1 once stacked as
    (keys, values)). shape, dtype and numel are the whole's; device and data_ptr are the first piece's.
    """

    __slots__ = ("pieces", "layer_dim")

    def __init__(self, pieces: Sequence[torch.Tensor], layer_dim: int = 0):
        if not pieces:
            raise ValueError("a LayerSplit needs at least one piece")
        self.pieces, self.layer_dim = list(pieces), layer_dim

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: torch.dtype,
              pieces: Sequence[tuple[torch.device, int]]) -> "LayerSplit":
        """Returns zeros of `shape` (layers first) in `pieces`: (device, layers) each, adding up to shape[0]."""
        if sum(n for _, n in pieces) != shape[0]:
            raise ValueError(f"pieces {[n for _, n in pieces]} do not add up to {shape[0]} layers")
        return cls([torch.zeros((n, *shape[1:]), dtype=dtype, device=device) for device, n in pieces])

    @property
    def sizes(self) -> list[int]:
        """Returns the layers in each piece."""
        return [p.shape[self.layer_dim] for p in self.pieces]

    @property
    def shape(self) -> torch.Size:
        """Returns the shape of the whole (the layers of every piece together)."""
        shape = list(self.pieces[0].shape)
        shape[self.layer_dim] = sum(self.sizes)
        return torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.pieces[0].dtype

    @property
    def device(self) -> torch.device:
        """Returns the first piece's device (layer 0's; an explicit device map puts the embeddings there too)."""
        return self.pieces[0].device

    @property
    def devices(self) -> list[torch.device]:
        """Returns each piece's device."""
        return [p.device for p in self.pieces]

    def dim(self) -> int:
        return self.pieces[0].dim()

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return sum(p.numel() for p in self.pieces)

    def element_size(self) -> int:
        return self.pieces[0].element_size()

    def data_ptr(self) -> int:
        """Returns the first piece's address (what a decode step's layout compares: a new allocation changes it)."""
        return self.pieces[0].data_ptr()

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} on {d}" for n, d in zip(self.sizes, self.devices))
        return f"LayerSplit(shape={tuple(self.shape)}, layer_dim={self.layer_dim}, pieces=[{parts}])"

    def whole(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Returns the pieces concatenated into one tensor on `device` (default: the first piece's): a copy."""
        device = self.device if device is None else device
        return torch.cat([p.to(device) for p in self.pieces], dim=self.layer_dim)

    def clone(self) -> "LayerSplit":
        return LayerSplit([p.clone() for p in self.pieces], self.layer_dim)

    def gather(self, dim: int, index: torch.Tensor) -> "LayerSplit":
        """Returns torch.gather along `dim` (not the layers'), each piece with its layers' rows of `index`."""
        if dim % self.dim() == self.layer_dim:
            raise IndexError("a LayerSplit cannot gather along its layer dim")
        parts = self._split(index, self.layer_dim)
        return LayerSplit([p.gather(dim, _move_index(i, p.device)) for p, i in zip(self.pieces, parts)],
                          self.layer_dim)

    def _split(self, value: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """Returns `value` cut along `dim` into the pieces' layer counts (or itself per piece where it broadcasts)."""
        if value.shape[dim] == 1 and sum(self.sizes) != 1:
            return [value] * len(self.pieces)
        if value.shape[dim] != sum(self.sizes):
            raise ValueError(f"a tensor of {value.shape[dim]} layers cannot fill a LayerSplit of {sum(self.sizes)}")
        return list(torch.split(value, self.sizes, dim=dim))

    def _index(self, index) -> tuple[tuple, int | None, int]:
        """Returns (the index, one entry per dim; the layer it names, or None for all of them; how many ints come
        before the layer dim) for an index of ints, slices and at most one Ellipsis."""
        index = index if isinstance(index, tuple) else (index,)
        if any(e is None or isinstance(e, (torch.Tensor, list)) for e in index):
            raise IndexError("a LayerSplit takes ints, slices and ... as indices")
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (self.dim() - len(index) + 1) + index[at + 1 :]
        index = index + (slice(None),) * (self.dim() - len(index))
        layer = index[self.layer_dim]
        ints_before = sum(isinstance(e, int) for e in index[: self.layer_dim])
        if isinstance(layer, int):
            total = sum(self.sizes)
            if not -total <= layer < total:
                raise IndexError(f"layer {layer} is out of range for {total} layers")
            return index, layer % total, ints_before
        if layer != slice(None):
            raise IndexError("a LayerSplit takes one layer or all of them (:), not a range of layers")
        return index, None, ints_before

    def _locate(self, layer: int) -> tuple[int, int]:
        """Returns (piece, layer within it) of a layer."""
        for i, n in enumerate(self.sizes):
            if layer < n:
                return i, layer
            layer -= n
        raise IndexError(f"layer {layer} is out of range")

    def _local(self, index: tuple, layer: int) -> tuple[int, tuple]:
        """Returns (piece, the index within that piece) for an index that names one layer."""
        piece, local = self._locate(layer)
        return piece, index[: self.layer_dim] + (local,) + index[self.layer_dim + 1 :]

    def __getitem__(self, index):
        index, layer, ints_before = self._index(index)
        if layer is not None:
            piece, local = self._local(index, layer)
            return self.pieces[piece][local]
        return LayerSplit([p[index] for p in self.pieces], self.layer_dim - ints_before)

    def __setitem__(self, index, value) -> None:
        index, layer, ints_before = self._index(index)
        if layer is not None:
            piece, local = self._local(index, layer)
            target = self.pieces[piece]
            target[local] = value.to(target.device) if isinstance(value, torch.Tensor) else value
            return
        for p, part in zip(self.pieces, self._parts(value, index, ints_before)):
            p[index] = part.to(p.device) if isinstance(part, torch.Tensor) else part

    def _parts(self, value, index: tuple, ints_before: int) -> list:
        """Returns each piece's part of a value written to x[index] (all layers): a LayerSplit's pieces (cut again if
        its pieces differ), a tensor cut along its layer dim, or the value itself where it broadcasts."""
        if isinstance(value, LayerSplit):
            if value.sizes == self.sizes:
                return value.pieces
            value = value.whole()
        if not isinstance(value, torch.Tensor):
            return [value] * len(self.pieces)
        result_dims = sum(not isinstance(e, int) for e in index)
        from_right = result_dims - (self.layer_dim - ints_before)  # the layer dim, counted from the last dim
        if value.dim() < from_right:
            return [value] * len(self.pieces)
        return self._split(value, value.dim() - from_right)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch.stack and torch.cat of LayerSplits of equal pieces work piece by piece; nothing else does."""
        kwargs = kwargs or {}
        if func not in (torch.stack, torch.cat):
            raise TypeError(f"{func.__name__} does not take a LayerSplit (a KV cache split across devices); "
                            "index it per layer, or join it with .whole()")
        tensors, dim = list(args[0]), args[1] if len(args) > 1 else kwargs.get("dim", 0)
        first = tensors[0]
        if not all(isinstance(t, LayerSplit) and t.sizes == first.sizes and t.layer_dim == first.layer_dim
                   for t in tensors):
            raise TypeError(f"{func.__name__} takes LayerSplits of the same pieces only")
        ndim = first.dim() + (1 if func is torch.stack else 0)
        dim %= ndim
        if func is torch.cat and dim == first.layer_dim:
            raise IndexError("LayerSplits cannot be concatenated along their layer dim")
        layer_dim = first.layer_dim + (1 if func is torch.stack and dim <= first.layer_dim else 0)
        pieces = [func([t.pieces[i] for t in tensors], dim=dim) for i in range(len(first.pieces))]
        return LayerSplit(pieces, layer_dim)


def _move_index(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Returns `index` on `device`, moving only the values of an expanded index (BatchCache.repack's spans every
    layer, head and dim with stride 0) and expanding them again there."""
    if index.device == device:
        return index
    base = index
    for dim, stride in enumerate(index.stride()):
        if stride == 0:
            base = base.narrow(dim, 0, 1)
    return base.to(device).expand(index.shape)


def cache_pieces(model) -> list[tuple[torch.device, int]] | None:
    """Returns the (device, layers) pieces a cache for `model` (a Transformer) is stored in: one per run of
    consecutive layers on one device, cut also where the device map's ranges start (model.block_ranges), or None
    when every layer is on the embedding's device (one plain tensor, as without a device map).

    Cutting at every range start, even between two ranges on the same device, is what lets a CPU-only machine run
    the split cache: "0-1:cpu,2-3:cpu" stores two pieces, as "0-1:cuda:0,2-3:cuda:1" would.
    """
    devices = getattr(model, "block_devices", None)
    if devices is None:
        return None
    starts = {r.start for r in getattr(model, "block_ranges", None) or ()}
    pieces: list[tuple[torch.device, int]] = []
    for i, device in enumerate(devices):
        device = torch.device(device)
        if pieces and pieces[-1][0] == device and i not in starts:
            pieces[-1] = (device, pieces[-1][1] + 1)
        else:
            pieces.append((device, 1))
    if len(pieces) == 1 and pieces[0][0] == model.wte.weight.device:
        return None
    return pieces


def kv_storage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
               pieces: Sequence[tuple[torch.device, int]] | None = None) -> torch.Tensor | LayerSplit:
    """Returns zeroed storage of `shape` (layers first): one tensor on `device`, or a LayerSplit of `pieces`."""
    if pieces is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return LayerSplit.zeros(shape, dtype, pieces)


class KVCache:
    """Keys and values of every layer: (layers, B, H, max_len, D), plus which slots hold real tokens.

    `pieces` (see cache_pieces) stores k and v as LayerSplits across devices; the slot bookkeeping (key_valid,
    key_pos) stays on `device`, the embedding's, where the masks are made.
    """

    # Set by a graphed decode step (neoj.cuda_graph): the slot written next, as a (1,) device tensor.
    # Then every shape is fixed, as a CUDA graph needs: writes go to `slot`, attention reads all
    # max_len slots and masks the ones past it.
    slot: torch.Tensor | None = None

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str,
                 pieces: Sequence[tuple[torch.device, int]] | None = None):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        # Zeros, not empty: masked slots get zero weight, and 0 * garbage could still be NaN.
        self.k = kv_storage(shape, dtype, device, pieces)
        self.v = kv_storage(shape, dtype, device, pieces)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        # Each slot's token position. Slots are in position order within a row, but a row may skip slots
        # (left padding, a speculative step's rejected tokens), so local-window distances are measured here.
        self.key_pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0
        self.padded = False  # set once any slot holds padding, so unpadded decode skips mask building

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """Returns an empty cache sized for `model` (a Transformer) and `max_len` tokens per row, each layer's keys
        and values on its layer's device."""
        cfg = model.config
        w = model.wte.weight
        return cls(cfg.n_layers, batch, getattr(model, "kv_heads", cfg.n_heads), cfg.head_dim, max_len, w.dtype,
                   w.device, cache_pieces(model))

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
