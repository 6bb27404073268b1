"""Generation and scoring for token-id prompts: the library's entry points to the engine.

generate_batch and stream_batch run their prompts through a private Engine driven on the calling thread,
the same decode path the server uses (see neoj.engine). score_ids gives a text's token log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from .engine import Completion, Engine, Event, PrefixCache, Speculative
from .errors import ContextLengthError
from .model import Transformer
from .model_utils import token_logprobs
from .sampling import GenerationParams
from .tokenizer import Tokenizer

__all__ = ["Completion", "Event", "Score", "generate_batch", "score_ids", "stream_batch"]


@torch.inference_mode()
def stream_batch(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], params: GenerationParams,
                 prefix_cache: PrefixCache | None = None,
                 speculative: Speculative | None = None) -> Iterator[list[Event]]:
    """Yields the events of the rows' first tokens, then after each decode step those of every row still running.

    Rows are the prompts each repeated num_return_sequences times (Event.row is a row's index). The finished
    Completions, in row order, are the generator's return value (`StopIteration.value`); generate_batch
    collects them. `prefix_cache` (kept by the caller, e.g. LanguageModel.prefix_cache, so that later calls
    reuse what this one stored) and `speculative` go to the private Engine (see neoj.engine.Engine).
    """
    params.validated()
    rows = len(prompts) * params.num_return_sequences
    if not rows:
        return []
    n_positions = model.config.n_positions
    # All rows join at once: one prefill of every prompt, and a cache sized for the whole run.
    engine = Engine(model, tokenizer, max_batch=rows, max_queue=0, prefill_tokens=len(prompts) * n_positions,
                    prefix_cache=prefix_cache, speculative=speculative)
    events: list[Event] = []
    request = engine.submit(prompts, params, events.append)
    longest = max(len(seq.prompt_ids) for seq in request.seqs)
    engine.cache.reserve(rows, longest + params.max_new_tokens)
    engine.admit()
    while events:
        batch = events[:]
        events.clear()
        yield batch
        engine.decode()
    return [seq.completion() for seq in request.seqs]


def generate_batch(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], params: GenerationParams,
                   prefix_cache: PrefixCache | None = None,
                   speculative: Speculative | None = None) -> list[Completion]:
    """Returns the Completions for token-id prompts (num_return_sequences per prompt, in order); prefix_cache
    and speculative as for stream_batch."""
    gen = stream_batch(model, tokenizer, prompts, params, prefix_cache=prefix_cache, speculative=speculative)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@dataclass
class Score:
    """Log-likelihood of a text under the model."""

    token_ids: list[int]
    token_logprobs: list[float]  # log P(token_i | tokens before it), for tokens 1..n-1
    total: float

    @property
    def perplexity(self) -> float:
        """Returns exp of the mean negative log-likelihood per scored token."""
        return math.exp(-self.total / max(1, len(self.token_logprobs)))


@torch.inference_mode()
def score_ids(model: Transformer, ids: list[int], chunk: int = 512) -> Score:
    """Returns per-token log-probabilities of `ids` (each token given all before it, within the context)."""
    cfg = model.config
    if len(ids) < 2:
        return Score(list(ids), [], 0.0)
    if len(ids) > cfg.n_positions:
        raise ContextLengthError(
            f"text has {len(ids)} tokens but the model's context is {cfg.n_positions}; "
            "use sliding-window perplexity for longer texts", len(ids), cfg.n_positions)
    x = torch.tensor([ids], device=model.wte.weight.device)
    hidden = model(x)[0, :-1]  # (T-1, C): position t predicts token t+1
    values, _ = token_logprobs(model, hidden, x[0, 1:], chunk=chunk)
    return Score(list(ids), values, float(sum(values)))
