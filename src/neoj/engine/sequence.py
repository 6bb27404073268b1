"""One generated row: the per-token bookkeeping every decode path shares.

A Sequence accepts each token the sampler chose and returns the Event to report: the text now safe to
show (held back while it could still be the start of a stop string, or while a character's bytes are
incomplete) and, on its last token, why it ended. Completion is the finished form callers get back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..constraint_matcher import Matcher
from ..sampling import GenerationParams
from ..tokenizer import StreamDecoder, Tokenizer

# Why a sequence ended: "eos" (<|endoftext|>), "stop" (a stop string), "length" (max_new_tokens),
# "time" (max_time), "cancelled" (client gone or engine stopping), "error" (the model failed).
FINISH_REASONS = ("eos", "stop", "length", "time", "cancelled", "error")

# The same reasons as the OpenAI API names them ("stop": the model or a stop string ended it).
OPENAI_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "time": "length", "cancelled": "stop",
                         "error": "stop"}


@dataclass
class Completion:
    """One finished sequence: its text, tokens, log-probabilities and why it ended."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # as the OpenAI API says it: "stop" (stop string or EOS) or "length"
    prompt_tokens: int = 0
    prompt_index: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    drafted_tokens: int = 0  # speculative guesses verified for this sequence
    accepted_tokens: int = 0  # of those, accepted

    @property
    def acceptance_rate(self) -> float | None:
        """Returns the share of speculative guesses accepted (None when none were made)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


@dataclass
class Event:
    """What one sequence produced in one step; finish_reason is set on its last event."""

    seq: "Sequence"
    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def row(self) -> int:
        """Returns the sequence's index in its request (prompt index x num_return_sequences + copy)."""
        return self.seq.index


class StopScanner:
    """Holds back text that could be the start of a stop string; finds a stop string once complete."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit); the stop string itself is never emitted."""
        self.held += piece
        if not self.stops:
            out, self.held = self.held, ""
            return out, False
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = max((self._prefix_at_end(s) for s in self.stops), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def _prefix_at_end(self, stop: str) -> int:
        """Returns the length of the longest proper prefix of `stop` that ends the held text."""
        for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        """Returns and forgets the text held back."""
        out, self.held = self.held, ""
        return out


class Owner(Protocol):
    """What a sequence reads from the request it belongs to (engine.request.Request)."""

    params: GenerationParams
    deadline: float | None


class Sequence:
    """One generated row: prompt, parameters, sampling state and the output so far."""

    def __init__(self, request: Owner, index: int, prompt_index: int, prompt_ids: list[int], seed: int,
                 tokenizer: Tokenizer, vocab: int, device: torch.device):
        params = request.params
        self.request, self.index, self.prompt_index, self.prompt_ids = request, index, prompt_index, prompt_ids
        self.params, self.seed = params, seed
        self.eos_token_id = tokenizer.eos_token_id
        # Each row samples from its own generator, so a seeded row's text never depends on its batch mates.
        self.generator = None if params.greedy else torch.Generator(device=device).manual_seed(seed)
        self.seen = self.counts = None  # the penalties' state: tokens seen (prompt too), tokens generated
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids, device=device)] = True
        if params.presence_penalty != 0 or params.frequency_penalty != 0:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        # Structured output: compiled here, when the request is submitted, so a grammar llguidance refuses
        # fails the submission (ConstraintError) rather than the generation.
        self.matcher = Matcher(params.constraint, tokenizer) if params.constraint is not None else None
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.scanner = StopScanner(params.stop)
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if params.logprobs else None
        self.prompt_logprobs: list[tuple[float | None, dict[int, float] | None]] | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.pos = 0  # tokens of this row in the cache = the position of the next token fed
        self.next_input = 0  # the last token chosen, fed to the model at the next step
        self.cached_tokens = 0  # prompt tokens reused from the prefix cache
        self.drafted_tokens = self.accepted_tokens = 0  # speculative guesses verified / accepted

    @property
    def last_token_due(self) -> bool:
        """Returns True when the next token accepted will be the last max_new_tokens allows."""
        return len(self.token_ids) + 1 >= self.params.max_new_tokens

    def accept(self, token: int, logprob: float | None, top: dict[int, float] | None, now: float) -> Event:
        """Records the token chosen for this row and returns its Event (finish_reason set when it ends here)."""
        self.token_ids.append(token)
        self.next_input = token
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top)
        text, reason, error = self._text_and_finish(token, now)
        self.text += text
        if reason is None and self.matcher is not None:
            self.matcher.prefetch()  # with constraint_matcher.PREFETCH, the next mask starts now
        return Event(self, text, token, logprob, top, reason, error)

    def _text_and_finish(self, token: int, now: float) -> tuple[str, str | None, str | None]:
        """Returns (text now safe to show, finish reason or None, error or None) after `token`."""
        if self.params.stop_at_eos and token == self.eos_token_id:
            error = self.matcher.error if self.matcher is not None else ""  # EOS forced by a broken matcher
            return self._drain(), "error" if error else "eos", error or None
        allowed = self.matcher is None or self.matcher.commit(token)
        text, hit = self.scanner.feed(self.decoder.push(token))
        if hit:
            return text, "stop", None
        if not allowed:
            return text + self._drain(), "error", f"the constraint refused token {token}: {self.matcher.error}"
        if self.matcher is not None and self.matcher.done:  # complete, and nothing else may follow
            return text + self._drain(), "stop", None
        return self._limits(text, now)

    def _limits(self, text: str, now: float) -> tuple[str, str | None, str | None]:
        """Returns (text, "length" or "time" when max_new_tokens or max_time ends the row here, None)."""
        deadline = self.request.deadline
        if len(self.token_ids) >= self.params.max_new_tokens:
            return text + self._drain(), "length", None
        if deadline is not None and now >= deadline:
            return text + self._drain(), "time", None
        return text, None, None

    def _drain(self) -> str:
        """Returns the text still held back when the row ends (a stop string in it still cuts it)."""
        text, hit = self.scanner.feed(self.decoder.flush())
        return text if hit else text + self.scanner.flush()

    def completion(self) -> Completion:
        """Returns the sequence as a Completion (finish reason as the OpenAI API names it)."""
        reason = OPENAI_FINISH_REASONS.get(self.finish_reason) if self.finish_reason else None
        return Completion(self.text, list(self.token_ids), self.logprobs, self.top_logprobs, reason,
                          len(self.prompt_ids), self.prompt_index, self.cached_tokens, self.drafted_tokens,
                          self.accepted_tokens)
