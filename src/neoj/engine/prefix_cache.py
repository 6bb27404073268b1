"""The prefix cache: keys and values of recent prompts, kept in fixed-size blocks, reused by later prompts.

A block holds `block_size` consecutive prompt tokens' keys and values for every layer, as one
(2, layers, heads, block_size, head_dim) tensor in the model's dtype on its device. For a model whose layers a device
map placed across devices the block is a LayerSplit (neoj.kv_cache) of that shape, each layer's part on its layer's
device: torch.stack and torch.cat below work on it piece by piece, and writing it back into a cache copies no layer
between devices. Its key is
(the id of the block before it, the block's tokens, the LoRA adapter): the parent's id stands for every token
before the block, so equal keys mean equal prefixes exactly, with no hash to collide. Keys and values depend
only on the tokens up to them and their positions (a prefix always starts at position 0), so a block computed
for one prompt is exact for any prompt that starts with the same tokens; GPT-J's rotated keys and GPT-Neo's
local layers included. The adapter is part of the key because an adapter changes keys and values.

Only full blocks are kept, at most `max_bytes` of tensors in all, the least recently used evicted first.
Lookups and stores touch a chain of blocks from its last block to its first, so a block is always more
recently used than its children and the least recently used block is a leaf: eviction never strands a child
that could still be reached. One cache may serve several engines of one model on different threads (the
server's engine thread, library calls' private engines), so every method takes a lock.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import NeojError

DEFAULT_PREFIX_CACHE_MB = 512
DEFAULT_BLOCK_SIZE = 16

ROOT = 0  # the "parent id" of a prompt's first block


@dataclass
class PrefixHit:
    """The cached blocks a prompt starts with, and how many of its tokens they cover (at most all but its last)."""

    tokens: int
    blocks: list[torch.Tensor]  # each (2, layers, heads, block_size, head_dim): keys, values

    def keys_values(self, n: int) -> torch.Tensor:
        """Returns the keys and values of the first n (<= tokens) prompt tokens, (2, layers, heads, n, head_dim)."""
        if not 0 <= n <= self.tokens:
            raise ValueError(f"the hit covers {self.tokens} tokens, not {n}")
        size = self.blocks[0].shape[3]
        return torch.cat(self.blocks[: -(-n // size)], dim=3)[:, :, :, :n]


class _Block:
    """One stored block: its id (the parent id of the blocks after it), key, keys and values, and size."""

    __slots__ = ("id", "key", "kv", "nbytes")

    def __init__(self, block_id: int, key: tuple, kv: torch.Tensor):
        self.id, self.key, self.kv = block_id, key, kv
        self.nbytes = kv.numel() * kv.element_size()


class PrefixCache:
    """Blocks of `block_size` tokens' keys and values (every layer), keyed by the tokens up to and including
    the block (and the LoRA adapter that computed them), at most `max_bytes` in all, least recently used
    evicted first."""

    def __init__(self, max_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1 or max_bytes < 0:
            raise NeojError(f"a prefix cache needs block_size >= 1 and max_bytes >= 0 (got {block_size}, {max_bytes})")
        self.max_bytes, self.block_size = max_bytes, block_size
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, reused from the cache
        self.used_bytes = 0
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._ids = itertools.count(ROOT + 1)
        self._lock = threading.Lock()

    @classmethod
    def megabytes(cls, mb: float, block_size: int = DEFAULT_BLOCK_SIZE) -> "PrefixCache | None":
        """Returns a cache of `mb` MiB, or None for 0 (prefix caching off)."""
        return cls(int(mb * 2**20), block_size) if mb > 0 else None

    @property
    def hit_rate(self) -> float:
        """Returns hit_tokens / queried_tokens (0 before any lookup)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def __len__(self) -> int:
        """Returns the number of blocks stored."""
        return len(self._blocks)

    def clear(self) -> None:
        """Forgets every block (after the model's weights change)."""
        with self._lock:
            self._blocks.clear()
            self.used_bytes = 0

    def lookup(self, tokens: list[int], adapter: str | None = None) -> PrefixHit | None:
        """Returns the longest chain of stored blocks that `tokens` (a prompt run with `adapter`) starts with,
        covering at most len(tokens) - 1 tokens (the last one must run to give the next token's logits); None
        when there is none. The chain becomes the most recently used."""
        with self._lock:
            chain = self._chain(tokens, adapter)
            self._touch(chain)
        covered = min(len(chain) * self.block_size, len(tokens) - 1)
        return PrefixHit(covered, [block.kv for block in chain]) if covered > 0 else None

    def record(self, queried: int, hit: int) -> None:
        """Counts a prompt of `queried` tokens looked up, of which `hit` were reused (what hit_rate reports)."""
        with self._lock:
            self.queried_tokens += queried
            self.hit_tokens += hit

    def store(self, tokens: list[int], adapter: str | None, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Stores the full blocks of a prompt not stored yet, from its keys and values (layers, heads,
        len(tokens), head_dim), evicting the least recently used blocks to stay within max_bytes; returns how
        many blocks it added. A block that cannot fit ends the chain there."""
        size, added = self.block_size, 0
        with self._lock:
            chain: list[_Block] = []
            for j in range(len(tokens) // size):
                key = self._key(chain, tokens[j * size : (j + 1) * size], adapter)
                block = self._blocks.get(key)
                if block is None:
                    part = slice(j * size, (j + 1) * size)
                    block = self._add(key, keys[:, :, part], values[:, :, part], {b.key for b in chain})
                    if block is None:
                        break
                    added += 1
                chain.append(block)
            self._touch(chain)
        return added

    def _key(self, chain: list[_Block], tokens: list[int], adapter: str | None) -> tuple:
        """Returns the key of the block of `tokens` that follows `chain` (the blocks before it)."""
        return (chain[-1].id if chain else ROOT, tuple(tokens), adapter)

    def _chain(self, tokens: list[int], adapter: str | None) -> list[_Block]:
        """Returns the stored blocks `tokens` starts with, first to last (the lock held)."""
        chain: list[_Block] = []
        size = self.block_size
        for j in range(len(tokens) // size):
            block = self._blocks.get(self._key(chain, tokens[j * size : (j + 1) * size], adapter))
            if block is None:
                break
            chain.append(block)
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        """Makes a chain the most recently used, its first block last, so parents outlive their children."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _add(self, key: tuple, k: torch.Tensor, v: torch.Tensor, keep: set[tuple]) -> _Block | None:
        """Stores a copy of one block's keys and values, evicting others (not those in `keep`, the chain it
        extends) to make room; returns it, or None when it cannot fit."""
        nbytes = 2 * k.numel() * k.element_size()
        if not self._make_room(nbytes, keep):
            return None
        block = _Block(next(self._ids), key, torch.stack((k, v)))
        self._blocks[key] = block
        self.used_bytes += block.nbytes
        return block

    def _make_room(self, nbytes: int, keep: set[tuple]) -> bool:
        """Evicts least recently used blocks (never those in `keep`) until nbytes more fit; returns whether they do.

        The first block outside `keep` is a leaf: its children are older than it, so they would come first,
        unless they are in `keep`, whose parents are all in `keep` too.
        """
        if nbytes > self.max_bytes:
            return False
        while self.used_bytes + nbytes > self.max_bytes:
            victim = next((key for key in self._blocks if key not in keep), None)
            if victim is None:
                return False
            self.used_bytes -= self._blocks.pop(victim).nbytes
        return True
