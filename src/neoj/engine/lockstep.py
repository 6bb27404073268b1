"""Engines in lockstep: one scheduler on rank 0, the same rounds on every rank of a tensor-parallel model.

Under tensor parallelism (neoj.tensor_parallel) every rank holds a share of each layer, so every rank must run
every forward pass, with the same batch, in the same order. Rank 0's engine (the server's) is the leader: it
takes requests from HTTP, and at the start of each round it decides everything that does not follow from the
model's outputs (which waiting sequences to admit, which requests end because a client left or a deadline
passed, whether a step may run ahead) and broadcasts that as a Round. The other ranks' engines follow: they
apply each Round exactly as the leader does. Everything after that is deterministic (the same logits on every
rank, each sequence sampling from its own seeded generator, the same prefix-cache state), so the batches, the
KV caches and the tokens stay identical without more messages.

An idle leader broadcasts an empty Round every HEARTBEAT_S seconds, so a follower waiting for work never runs
into the collective timeout; a rank that dies makes the next collective fail (or time out), which stops the
engines with an error instead of a hang.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..distributed import Processes, ProcessesError
from ..errors import NeojError
from ..sampling import GenerationParams

HEARTBEAT_S = 5.0


@dataclass
class SequenceSpec:
    """What a follower needs to make a sequence the leader made: its place in the request, prompt and seed."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    seed: int


@dataclass
class RequestSpec:
    """A request the followers have not seen yet: sent with the round that first admits one of its sequences."""

    key: int
    params: GenerationParams
    prompt_logprobs: int | None
    priority: int
    seqs: list[SequenceSpec]


@dataclass
class Round:
    """The leader's decisions for one round, broadcast to every follower before it runs."""

    new_requests: list[RequestSpec] = field(default_factory=list)
    admit: list[tuple[int, int]] = field(default_factory=list)  # (request key, sequence index), in order
    ends: list[tuple[int, str]] = field(default_factory=list)  # (request key, "cancelled" or "time")
    may_run_ahead: bool = False
    stop: bool = False

    @property
    def idle(self) -> bool:
        """Returns True for a heartbeat: nothing to admit or end (a decode step still runs if rows are running)."""
        return not (self.new_requests or self.admit or self.ends or self.stop)


class Lockstep:
    """The link between the engines of a tensor-parallel model's ranks: the leader's send, the followers' receive."""

    def __init__(self, processes: Processes):
        self.processes = processes
        self.known: dict[int, object] = {}  # request key -> Request, for the requests the followers know

    @property
    def leads(self) -> bool:
        """Returns True on rank 0, whose engine decides the rounds."""
        return self.processes.main

    def send(self, round_: Round) -> None:
        """Broadcasts the leader's round (rank 0)."""
        self._broadcast(round_)

    def receive(self) -> Round:
        """Returns the leader's next round (other ranks); blocks until it comes."""
        return self._broadcast(None)

    def _broadcast(self, value):
        try:
            return self.processes.broadcast(value)
        except (RuntimeError, ValueError, OSError) as exc:  # a rank died, or a collective timed out
            raise ProcessesError(f"tensor-parallel rank {self.processes.rank} lost the other ranks (one died or "
                                 f"stopped answering): {collective_failure(exc)}") from exc

    def forget_finished(self) -> None:
        """Drops the requests whose sequences have all finished."""
        for key in [key for key, req in self.known.items() if req.done]:
            del self.known[key]


def collective_failure(exc: Exception) -> str:
    """Returns the gist of a failed collective's error: gloo's message without its source path and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]


def request_spec(key: int, req) -> RequestSpec:
    """Returns the RequestSpec of a leader's Request (its params, and each sequence's prompt and seed)."""
    return RequestSpec(key, req.params, req.prompt_logprobs, req.priority,
                       [SequenceSpec(s.index, s.prompt_index, s.prompt_ids, s.seed) for s in req.seqs])


class NotReplicated(NeojError):
    """Model work that runs outside the engine's rounds (embeddings, task scoring), which the ranks of a
    tensor-parallel model cannot run in step: refused rather than left to hang."""
