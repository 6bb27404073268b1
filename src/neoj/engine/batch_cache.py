"""The running batch's KV cache: right-aligned rows spliced in after their prefill, leaving between steps."""

from __future__ import annotations

import torch

from ..kv_cache import KVCache, cache_pieces, kv_storage
from ..model import Transformer


class BatchCache(KVCache):
    """The running batch's KV cache: rows are spliced in after their prefill and leave between steps.

    Row i's tokens occupy slots [starts[i], length); slots before are invalid (masked). Storage is
    (layers, row capacity, H, max_len, D); `k`, `v` and `key_valid` are views of the active rows, which is
    what the model reads and writes. Storage grows by reallocation; all-invalid leading columns are compacted.
    A model placed across devices gets its keys and values stored per device (LayerSplits, see
    neoj.kv_cache.cache_pieces); the moves below index them as one tensor either way.
    """

    def __init__(self, model: Transformer, max_rows: int):
        cfg, w = model.config, model.wte.weight
        self.dims = (cfg.n_layers, getattr(model, "kv_heads", cfg.n_heads), cfg.head_dim)  # kv_heads: a rank's share
        self.dtype, self.device = w.dtype, w.device
        self.pieces = cache_pieces(model)
        self.max_rows, self.limit = max_rows, cfg.n_positions
        self.starts: list[int] = []
        self.length = 0
        self.holes = False  # some row skips slots after its start (rolled-back speculation)
        self._k = self._v = self._valid = self._pos = None
        self._allocate(0, 0)

    @property
    def rows(self) -> int:
        """Returns the number of active rows."""
        return len(self.starts)

    @property
    def layout(self) -> tuple[int, int, int]:
        """Returns (rows, storage address, slots per row): what a recorded decode step depends on."""
        return self.rows, self._k.data_ptr(), self.max_len

    def reserve(self, rows: int, length: int) -> None:
        """Allocates room for `rows` rows of `length` slots now (exactly, up to the context), so the batch
        does not grow step by step."""
        row_cap, len_cap = self._k.shape[1], self._k.shape[3]
        if rows > row_cap or length > len_cap:
            self._allocate(max(rows, row_cap), max(min(length, self.limit), len_cap))

    def begin(self, lengths: list[int]) -> "BatchCache":
        """Readies the empty batch for a left-padded prefill written from slot 0, one row per prompt length
        (row i's tokens end up in its last lengths[i] slots of max(lengths)); returns self. A prefill that reuses
        cached prefixes writes them into the first slots itself (prefill.load_prefixes), then runs the rest."""
        if self.starts:
            raise ValueError("a prefill in place needs an empty batch")
        width = max(lengths)
        self._reserve(len(lengths), width + 1)
        self.slot = None  # a prefill is eager, whatever decode steps ran on this cache before
        self.length = 0
        self.starts = [width - n for n in lengths]
        self._valid[: len(lengths)] = True  # the prefill's forward marks the padding
        self._sync()
        return self

    def _allocate(self, row_cap: int, len_cap: int) -> None:
        layers, heads, dim = self.dims
        shape = (layers, row_cap, heads, len_cap, dim)
        k = kv_storage(shape, self.dtype, self.device, self.pieces)
        v = kv_storage(shape, self.dtype, self.device, self.pieces)
        valid = torch.ones(row_cap, len_cap, dtype=torch.bool, device=self.device)
        pos = torch.zeros(row_cap, len_cap, dtype=torch.long, device=self.device)
        n, L = self.rows, self.length
        if n and L:
            k[:, :n, :, :L] = self._k[:, :n, :, :L]
            v[:, :n, :, :L] = self._v[:, :n, :, :L]
            valid[:n, :L] = self._valid[:n, :L]
            pos[:n, :L] = self._pos[:n, :L]
        self._k, self._v, self._valid, self._pos, self.max_len = k, v, valid, pos, len_cap
        self._sync()

    def _sync(self) -> None:
        n = self.rows
        self.k, self.v, self.key_valid, self.key_pos = self._k[:, :n], self._v[:, :n], self._valid[:n], self._pos[:n]
        if not self.starts:
            self.holes = False
        self.padded = self.holes or any(s > 0 for s in self.starts)

    def _reserve(self, rows: int, length: int) -> None:
        row_cap, len_cap = self._k.shape[1], self._k.shape[3]
        if rows <= row_cap and length <= len_cap:
            return
        if rows > row_cap:
            row_cap = max(rows, min(self.max_rows, 2 * row_cap))
        if length > len_cap:
            grown = max(length + 64, len_cap * 3 // 2)
            len_cap = -(-grown // 64) * 64
            if len_cap > self.limit >= length:
                len_cap = self.limit
        self._allocate(row_cap, len_cap)

    def _shift(self, d: int) -> None:
        """Moves every row d slots right (d > 0) or left (d < 0) in the cache."""
        n, L = self.rows, self.length
        if d > 0:
            for t in (self._k, self._v):
                t[:, :n, :, d : d + L] = t[:, :n, :, :L].clone()
            self._valid[:n, d : d + L] = self._valid[:n, :L].clone()
            self._pos[:n, d : d + L] = self._pos[:n, :L].clone()
            self._valid[:n, :d] = False
        else:
            d0 = -d
            for t in (self._k, self._v):
                t[:, :n, :, : L - d0] = t[:, :n, :, d0:L].clone()
            self._valid[:n, : L - d0] = self._valid[:n, d0:L].clone()
            self._pos[:n, : L - d0] = self._pos[:n, d0:L].clone()
            self._valid[:n, L - d0 :] = True
        self.starts = [s + d for s in self.starts]
        self.length += d
        self._sync()

    def compact(self, min_gap: int = 1) -> None:
        """Drops leading columns that no row uses, when there are at least min_gap of them."""
        if self.starts and min(self.starts) >= min_gap:
            self._shift(-min(self.starts))

    def ensure_room(self, T: int = 1) -> None:
        """Makes room to write T more tokens at the shared index, compacting before growing (and closing
        holes before growing past the context)."""
        if self.length + T <= self.max_len:
            return
        if self.holes and self.length + T > self.limit:
            self.repack()
        if self.starts and (min(self.starts) >= self.max_len // 4 or self.max_len >= self.limit):
            self.compact()
        self._reserve(self.rows, self.length + T)

    def add(self, src: KVCache, p: int, row: int = 0, end: int | None = None) -> int:
        """Splices a prefilled row (slots [end - p, end) of src's row `row`; end defaults to p) in at
        [length - p, length); returns its row in the batch."""
        end = p if end is None else end
        if not self.starts:
            self.length = 0
        if max(self.length, p) + 1 > self.max_len:
            self.compact()
        self._reserve(self.rows + 1, max(self.length, p) + 1)
        if p > self.length:
            self._shift(p - self.length)
        i, L = self.rows, self.length
        self._k[:, i, :, L - p : L] = src.k[:, row, :, end - p : end]
        self._v[:, i, :, L - p : L] = src.v[:, row, :, end - p : end]
        self._pos[i, L - p : L] = torch.arange(p, device=self.device)
        self._valid[i, : L - p] = False
        self._valid[i, L - p :] = True
        self.starts.append(L - p)
        self._sync()
        return i

    def remove(self, i: int) -> None:
        """Drops row i by moving the last row into its place (the caller mirrors the move)."""
        last, L = self.rows - 1, self.length
        if i != last:
            self._k[:, i, :, :L] = self._k[:, last, :, :L]
            self._v[:, i, :, :L] = self._v[:, last, :, :L]
            self._valid[i] = self._valid[last]
            self._pos[i] = self._pos[last]
            self.starts[i] = self.starts[last]
        self.starts.pop()
        if not self.starts:
            self.length = 0
        self._sync()

    def keep_written(self, written: int, keep: list[int]) -> None:
        """Rolls back a multi-token step: of the `written` slots just written, row i keeps its first keep[i]
        (a speculative step's accepted tokens) and the rest become holes; the write index moves back to the end
        of the longest row kept."""
        start = self.length - written
        for i, n in enumerate(keep):
            if n < written:
                self._valid[i, start + n : start + written] = False
        self.length = start + max(keep, default=0)
        self._valid[: self.rows, self.length : start + written] = True  # slots from length on are written valid
        self.holes = self.holes or min(keep, default=written) < max(keep, default=0)
        self._sync()

    def repack(self) -> None:
        """Moves each row's valid slots together (right-aligned), closing the holes rolled-back steps left."""
        n, L = self.rows, self.length
        if not n or not self.holes:
            return
        valid = self._valid[:n, :L]
        counts = valid.sum(dim=1)
        width = int(counts.max())
        # Row i's j-th valid slot goes to width - counts[i] + j: sort slots valid-last, keeping their order.
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, L - width :]  # (n, width)
        for t in (self._k, self._v):
            index = order[None, :, None, :, None].expand(t.shape[0], n, t.shape[2], width, t.shape[4])
            t[:, :n, :, :width] = t[:, :n, :, :L].gather(3, index)
        self._pos[:n, :width] = self._pos[:n, :L].gather(1, order)
        self._valid[:n, :width] = self._valid[:n, :L].gather(1, order)
        self._valid[:n, width:L] = True
        self.length, self.holes = width, False
        self.starts = [width - int(c) for c in counts.tolist()]
        self._sync()
