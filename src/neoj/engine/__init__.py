"""Continuous batching: one model thread admits waiting requests between decode steps and retires finished ones.

The running batch lives in one BatchCache whose rows are right-aligned: each row's tokens are contiguous and
end at the shared write index, so new requests are prefilled on their own (those admitted in one round
together, left-padded) and spliced in, and local-window distances stay exact. Every sequence keeps its own
sampling parameters, generator, stop strings and deadline, and reports through its own sink (called on the
model thread; the server's sinks collect events and hand each step's to the event loop at once, see
Engine.on_events). Other model work (scoring for tasks, embeddings) runs on the same thread between decode
steps: Engine.call runs one function, Engine.call_pieces a long job one piece per round.

    batch_cache.py  BatchCache: the running rows' keys and values
    sampler.py      RowSampler: next tokens under per-row parameters (greedy rows in one pass)
    scheduler.py    Engine, Request, Sequence, Event: the queue, admission, prefill and the decode step
"""

from .batch_cache import BatchCache
from .sampler import RowSampler
from .scheduler import FINISH_REASONS, Engine, EngineStats, Event, QueueFull, Request, Sequence

__all__ = ["Engine", "EngineStats", "Event", "QueueFull", "Request", "Sequence", "BatchCache", "RowSampler",
           "FINISH_REASONS"]
