"""Embeddings for every route that serves them: OpenAI's /v1/embeddings and the Hugging Face feature-extraction
routes (see hf_api). One vector per input: the mean of the final hidden states (neoj.model_utils.embed_rows), as
LanguageModel.embed.

Embedding runs on the engine's model thread, the one thread that may touch the model while it serves, but
never all at once: the inputs are cut into pieces of about PIECE_TOKENS tokens (padding included), and the engine runs one piece
per round between decode steps (Engine.call_pieces), so running streams keep getting a token every step
while a large request is embedded. A request holds at most MAX_INPUTS inputs of at most the model's context
each and MAX_TOTAL_TOKENS in all, which bounds the work one request can queue.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from ..engine import QueueFull
from ..engine.lockstep import NotReplicated
from ..model_utils import embed_rows
from .common import APIError, ServerState, unless_disconnected

# Per request, as OpenAI's own limits (so clients that batch to them, such as LangChain's 1000-input chunks, work):
# the work is bounded, and running streams do not wait on it since it runs in pieces between decode steps.
MAX_INPUTS = 2048  # also GET /info's max_client_batch_size
MAX_TOTAL_TOKENS = 300_000
# Tokens embedded per piece between two decode steps: a few decode steps' worth of compute, so a stream's
# next token waits for at most one such piece.
PIECE_TOKENS = 256


def input_count(value) -> int:
    """Returns how many inputs a request's input field holds (text, texts, token ids or lists of token ids),
    before anything is tokenized."""
    if isinstance(value, str) or not isinstance(value, list) or not value or isinstance(value[0], int):
        return 1
    return len(value)


def check_count(value, param: str) -> None:
    """Raises a 422 naming the limit when the input field holds more than MAX_INPUTS inputs."""
    n = input_count(value)
    if n > MAX_INPUTS:
        raise APIError(422, f"{param} holds {n} inputs; one request may embed at most {MAX_INPUTS}: split it into "
                       "several requests", param=param)


def check_dimensions(state: ServerState, dimensions: int | None) -> None:
    """Raises a 422 unless `dimensions` is unset or the model's hidden size (vectors are never truncated)."""
    hidden = state.lm.config.hidden_size
    if dimensions is not None and dimensions != hidden:
        raise APIError(422, f"dimensions={dimensions} is not supported: this model's embeddings have "
                       f"{hidden} dimensions", param="dimensions")


def check_lengths(state: ServerState, inputs: list[list[int]], param: str, hint: str = "") -> None:
    """Raises a 400 naming the token count and the limit when an input is longer than the context, or all of
    them together hold more than MAX_TOTAL_TOKENS."""
    total = sum(len(ids) for ids in inputs)
    if total > MAX_TOTAL_TOKENS:
        raise APIError(400, f"{param} holds {total} tokens in all; one request may embed at most {MAX_TOTAL_TOKENS}: "
                       "split it into several requests", param=param)
    limit = state.n_positions
    for i, ids in enumerate(inputs):
        if len(ids) > limit:
            raise APIError(400, f"{param}[{i}] has {len(ids)} tokens, but this model's maximum context length is "
                           f"{limit} tokens{hint}", param=param)


def pieces(inputs: list[list[int]], tokens: int = PIECE_TOKENS) -> list[list[int]]:
    """Returns the inputs' indices in consecutive groups whose padded forward (inputs x the longest) holds at most
    `tokens` tokens; a longer input alone."""
    groups: list[list[int]] = []
    width = 0
    for i, ids in enumerate(inputs):
        if groups and (len(groups[-1]) + 1) * max(width, len(ids)) <= tokens:
            groups[-1].append(i)
            width = max(width, len(ids))
        else:
            groups.append([i])
            width = len(ids)
    return groups


async def embed(state: ServerState, request: Request, inputs: list[list[int]]) -> list[list[float]]:
    """Returns one mean-pooled final hidden state per input, computed piece by piece between decode steps.

    Each piece is one right-padded forward (neoj.model_utils.embed_rows, as neoj.tasks embeds), equal to
    LanguageModel.embed's one-input forwards to float rounding. Raises APIError 503 when the engine's queue is
    full, ClientGone when the client disconnects first (the pieces left are skipped).
    """
    model, eos = state.lm.model, state.lm.tokenizer.eos_token_id

    def piece(group: list[int]) -> list[list[float]]:
        return [vec.tolist() for vec in embed_rows(model, [inputs[i] for i in group], eos)]

    jobs = [lambda g=g: piece(g) for g in pieces(inputs)]
    try:
        future = state.engine.start().call_pieces(jobs)
    except NotReplicated as exc:
        raise APIError(501, str(exc)) from None
    except QueueFull as exc:
        state.metrics.rejected.inc()
        raise APIError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
    results = await unless_disconnected(request, asyncio.wrap_future(future))
    return [vec for group in results for vec in group]
