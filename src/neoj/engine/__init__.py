"""Continuous batching: the engine admits waiting requests between decode steps and retires finished ones.

Every generation in neoj runs through one Engine: the server's thread drives one long-lived engine;
generate_batch and stream_batch drive a private one on the caller's thread. The running batch lives in one
BatchCache whose rows are right-aligned: each row's tokens end at the shared write index, so new requests are
prefilled on their own (those admitted in one round together, left-padded, after the longest prefix each finds
in the PrefixCache) and spliced in. A speculative step (Speculative) writes a row's guesses and rolls back the
rejected ones, leaving holes; every slot records its token's position, so local-window distances stay exact.
Every sequence keeps its own sampling parameters, generator,
stop strings and deadline, and reports through its own sink. Other model work (scoring for tasks,
embeddings) runs on the same thread between decode steps: Engine.call runs one function, Engine.call_pieces
a long job one piece per round.

    sequence.py     Sequence, Event, Completion, StopScanner: per-token bookkeeping and finish reasons
    events.py       drain, Countdown, failure: waiting on a request's events until its sequences finish
    request.py      Request, Prefill, WaitingQueue (priority, then arrival), Job, QueueFull, EngineStats and
                    Latencies (time to first token, inter-token, end-to-end, queue): what the engine queues
    sampler.py      Sampler: next tokens under per-row parameters, generators and constraints
    prefill.py      prefill: new prompts through the model before they join the batch (reusing cached
                    prefixes); scoring rows with cached prefixes for the tasks
    running.py      RunningBatch: the rows being decoded, their decode steps (CUDA graphs), run-ahead
    batch_cache.py  BatchCache: the running rows' keys and values
    prefix_cache.py PrefixCache: keys and values of recent prompts in blocks, reused by later prompts
    speculation.py  Speculative and the proposers (prompt lookup, draft model): guesses verified in one step
    scheduler.py    Engine: the queue, admission, rounds on its thread or the caller's
    admission.py    new_request, admit_sequences: requests checked and made; admitted sequences prefilled, started
    lockstep.py     Lockstep, Round: the engines of a tensor-parallel model's ranks, rank 0 leading the others
"""

from .batch_cache import BatchCache
from .prefix_cache import PrefixCache
from .speculation import Speculative
from .request import EngineStats, Prefill, QueueFull, Request
from .running import RunningBatch
from .sampler import Sampler, Selection
from .scheduler import Engine
from .sequence import FINISH_REASONS, OPENAI_FINISH_REASONS, Completion, Event, Sequence, StopScanner

__all__ = ["PrefixCache", "Speculative", "Engine", "EngineStats", "Event", "QueueFull", "Request", "Prefill", "Sequence",
           "BatchCache", "RunningBatch", "Sampler", "Selection", "Completion", "StopScanner", "FINISH_REASONS",
           "OPENAI_FINISH_REASONS"]
