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

Lockstep runs both loops: `lead` (rank 0's model thread) and `follow` drive the Engine through its public side
(plan_round, admit_taken, decode); the Engine keeps its queue, its lock and its life cycle (start, follow, the
shutdown, a fatal error).
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field

from ..distributed import Processes, ProcessesError
from ..errors import NeojError
from ..sampling import GenerationParams
from .request import Request
from .sequence import Sequence

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
    """The link between the engines of a tensor-parallel model's ranks: the requests both sides know, the leader's
    plans and send, the followers' receive, and the loops of both (lead, follow)."""

    def __init__(self, processes: Processes):
        self.processes = processes
        self.known: dict[int, Request] = {}  # request key -> Request, for the requests the followers know
        self._keys = itertools.count()  # the leader's request keys, as its followers know them
        self._ends: dict[Request, str] = {}  # the leader's requests to end at the next round: "cancelled"

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

    # ---- the leader's side (its engine's submit, cancel and plan_round call these; end and plan under its lock) ----

    def adopt(self, req: Request) -> None:
        """Gives a leader's new request its key; its deadline becomes an end that a round decides (see plan)."""
        req.key, req.end_at, req.deadline = next(self._keys), req.deadline, None

    def end(self, req: Request, reason: str) -> None:
        """Ends a leader's request at the start of the next round (its first reason wins)."""
        self._ends.setdefault(req, reason)

    @property
    def ending(self) -> bool:
        """Returns True while requests wait to be ended by the next round."""
        return bool(self._ends)

    def plan(self, seqs: list[Sequence], may_run_ahead: bool) -> Round:
        """Returns the leader's next Round: the requests to end (cancelled, or past their deadline), the admission
        of `seqs` (taken from the queue; their requests sent when first seen), and whether a step may run ahead."""
        now = time.monotonic()
        ends = [(req.key, reason) for req, reason in self._ends.items() if req.key in self.known]
        self._ends.clear()
        ends += [(key, "time") for key, req in self.known.items()
                 if req.end_at is not None and now >= req.end_at and not req.cancelled]
        round_ = Round(ends=ends, may_run_ahead=may_run_ahead)
        for seq in seqs:
            req = seq.request
            if req.key not in self.known:
                self.known[req.key] = req
                round_.new_requests.append(request_spec(req.key, req))
            round_.admit.append((req.key, seq.index))
        return round_

    # ---- the loops ----

    def lead(self, engine) -> None:
        """Runs the leader's rounds on `engine` (rank 0's Engine) until it stops: each is planned, broadcast, then
        run as every follower runs it; an idle leader sends a heartbeat round every HEARTBEAT_S."""
        while True:
            round_, seqs = engine.plan_round(HEARTBEAT_S)
            self.send(round_)
            if round_.stop:
                break
            self.run(engine, round_, seqs)

    def follow(self, engine) -> None:
        """Runs the rounds the leader broadcasts on `engine` (this rank's Engine) until the leader stops."""
        while True:
            round_ = self.receive()
            if round_.stop:
                break
            self.run(engine, round_, self.followed_sequences(engine, round_))

    def followed_sequences(self, engine, round_: Round) -> list[Sequence]:
        """Makes the requests the leader sent for the first time; returns the sequences the round admits."""
        for spec in round_.new_requests:
            req = Request(spec.params, lambda event: None, None, spec.prompt_logprobs, spec.priority)
            req.key, req.end_at = spec.key, None
            req.seqs = [Sequence(req, s.index, s.prompt_index, s.prompt_ids, s.seed, engine.tokenizer, engine.vocab,
                                 engine.device) for s in spec.seqs]
            self.known[spec.key] = req
        return [self.known[key].seqs[index] for key, index in round_.admit]

    def run(self, engine, round_: Round, seqs: list[Sequence]) -> None:
        """Runs one round on `engine` as every rank runs it: the ends, the admission of `seqs`, one decode step."""
        for key, reason in round_.ends:
            req = self.known[key]
            req.cancelled, req.cancel_reason = True, reason
        engine.admit_taken(seqs)
        engine.decode(may_run_ahead=round_.may_run_ahead)
        self.forget_finished()


def collective_failure(exc: Exception) -> str:
    """Returns the gist of a failed collective's error: gloo's message without its source path and advice."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]


def request_spec(key: int, req: Request) -> RequestSpec:
    """Returns the RequestSpec of a leader's Request (its params, and each sequence's prompt and seed)."""
    return RequestSpec(key, req.params, req.prompt_logprobs, req.priority,
                       [SequenceSpec(s.index, s.prompt_index, s.prompt_ids, s.seed) for s in req.seqs])


class NotReplicated(NeojError):
    """Model work that runs outside the engine's rounds (embeddings, task scoring), which the ranks of a
    tensor-parallel model cannot run in step: refused rather than left to hang."""
