"""Continuous batching: one model thread admits waiting requests between decode steps and retires finished ones.

The running batch lives in one BatchCache whose rows are right-aligned: each row's tokens are contiguous and
end at the shared write index, so a new request is prefilled alone (B=1) and spliced in, and local-window
distances stay exact. Every sequence keeps its own sampling parameters, generator, stop strings and deadline,
and reports through its own sink (called on the model thread; the server forwards it to its event loop).
"""

from .batch_cache import BatchCache
from .sampler import RowSampler
from .scheduler import FINISH_REASONS, Engine, EngineStats, Event, QueueFull, Request, Sequence

__all__ = ["Engine", "EngineStats", "Event", "QueueFull", "Request", "Sequence", "BatchCache", "RowSampler",
           "FINISH_REASONS"]
