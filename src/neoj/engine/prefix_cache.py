"""The prefix cache: keys and values of recent prompts, kept in fixed-size blocks, reused by later prompts.

(Interface; the implementation follows.)
"""

from __future__ import annotations

DEFAULT_PREFIX_CACHE_MB = 512
DEFAULT_BLOCK_SIZE = 16


class PrefixCache:
    """Blocks of `block_size` tokens' keys and values (every layer), keyed by the tokens up to and including
    the block (and the LoRA adapter that computed them), at most `max_bytes` in all, least recently used
    evicted first."""

    def __init__(self, max_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE):
        self.max_bytes, self.block_size = max_bytes, block_size
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found
        self.used_bytes = 0

    @classmethod
    def megabytes(cls, mb: float, block_size: int = DEFAULT_BLOCK_SIZE) -> "PrefixCache | None":
        """Returns a cache of `mb` MiB, or None for 0 (prefix caching off)."""
        return cls(int(mb * 2**20), block_size) if mb > 0 else None

    @property
    def hit_rate(self) -> float:
        """Returns hit_tokens / queried_tokens (0 before any lookup)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def clear(self) -> None:
        """Forgets every block (after the model's weights change)."""
        self.used_bytes = 0
