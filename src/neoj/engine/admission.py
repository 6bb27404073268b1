"""Admission: how requests reach the running batch. A submitted request is checked and made (new_request); the
sequences a round takes from the queue are prefilled and started in the running batch (admit_sequences).

New prompts go through the model in padded groups (prefill_groups) after the longest prefix each finds in the
PrefixCache; into an empty batch, one group of prompts each starting one sequence is prefilled in place, straight
into the batch's cache. Each started sequence samples its first token as it joins the batch. These functions drive
an Engine (neoj.engine.scheduler) through its public side, on its model thread.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..adapters import check_adapter_request
from ..errors import GenerationError
from ..model_utils import fit_prompt
from ..sampling import GenerationParams
from .prefill import look_up_prefixes, prefill, prefill_groups, remember_prefixes
from .prefix_cache import PrefixHit
from .request import Prefill, Request
from .sequence import Event, Sequence

log = logging.getLogger(__name__)


def new_request(engine, prompts: list[list[int]], params: GenerationParams, sink: Callable[[Event], None],
                max_time: float | None, prompt_logprobs: int | None, priority: int = 0) -> Request:
    """Returns a Request of checked, context-fitted prompts for `engine` (an Engine), each repeated
    num_return_sequences times."""
    params.validated()
    check_adapter_request(engine.model, params.adapter)  # a LoRA adapter the model does not serve
    if max_time is not None and not max_time > 0:
        raise GenerationError(f"max_time={max_time!r} must be > 0 seconds")
    if prompt_logprobs is not None and not 0 <= prompt_logprobs <= 20:
        raise GenerationError(f"prompt logprobs={prompt_logprobs!r} must be between 0 and 20")
    n_pos, usable = engine.model.config.n_positions, engine.sampler.usable_vocab
    fitted = [fit_prompt(ids or [engine.tokenizer.eos_token_id], params.max_new_tokens, n_pos, params.truncate)
              for ids in prompts]
    for ids in fitted:
        bad = [t for t in ids if not 0 <= t < usable]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {usable})")
    if any(t >= usable for t in params.logit_bias or ()):
        raise GenerationError(f"logit_bias names a token id outside the vocabulary [0, {usable})")
    req = Request(params, sink, max_time, prompt_logprobs, priority)
    n = params.num_return_sequences
    for i, ids in enumerate(fitted):
        for j in range(n):  # unseeded: a seed from torch's generator, so torch.manual_seed repeats a run
            seed = params.seed + j if params.seed is not None else \
                0 if params.greedy else int(torch.randint(0, 2**62, (1,)))
            req.seqs.append(Sequence(req, i * n + j, i, ids, seed, engine.tokenizer, engine.vocab, engine.device))
    return req


def admit_sequences(engine, seqs: list[Sequence]) -> None:
    """Prefills the new prompts of `seqs` (in padded groups, reusing cached prefixes) and starts the sequences
    on `engine` (an Engine); those cancelled, asking for nothing, or failing to prefill end instead."""
    todo, fresh = [], {}
    for seq in seqs:
        req = seq.request
        if req.cancelled:
            engine.end(seq, req.cancel_reason)
        elif seq.params.max_new_tokens == 0 and req.prompt_logprobs is None:
            engine.end(seq, "length")
        else:
            todo.append(seq)
            if seq.prompt_index not in req.prefills:
                fresh.setdefault((id(req), seq.prompt_index), seq)
    prompts = list(fresh.values())
    hits = look_up_prefixes(engine.prefix_cache, prompts) if engine.prefix_cache is not None else {}
    groups = prefill_groups(prompts, engine.prefill_tokens, {seq: hit.tokens for seq, hit in hits.items()})
    # Into an empty batch, one group of prompts each starting one sequence is prefilled in place: its
    # keys and values are written straight into the batch's cache (no second cache, no copy).
    in_place = not engine.running and len(groups) == 1 and len(groups[0]) == len(todo) and \
        all(seq.params.max_new_tokens > 0 for seq in todo)
    failed = prefill_all(engine, groups, in_place, hits)
    ready = []
    for seq in todo:
        error = failed.get((id(seq.request), seq.prompt_index))
        if error is not None:
            engine.end(seq, "error", error)
        else:
            ready.append(seq)
    start_sequences(engine, ready)


def prefill_all(engine, groups: list[list[Sequence]], in_place: bool,
                hits: dict[Sequence, PrefixHit]) -> dict[tuple[int, int], str]:
    """Prefills each group's prompts into their requests (in_place: the one group straight into the batch's
    cache), reusing their `hits`, and stores their blocks in the prefix cache; returns the error of each
    prompt that failed (when the engine ends rows with errors instead of raising)."""
    failed: dict[tuple[int, int], str] = {}
    for group in groups:
        try:
            cache = engine.cache.begin([len(seq.prompt_ids) for seq in group]) if in_place else None
            done = prefill(engine.model, group, engine.tokenizer.eos_token_id, cache, [hits.get(s) for s in group])
            for seq, result in zip(group, done):
                seq.request.prefills[seq.prompt_index] = result
                engine.stats.prompt_tokens += len(seq.prompt_ids)
            remember_group(engine, group, done)
        except Exception as exc:
            if in_place:
                engine.batch.reset()
            if engine.raise_errors:
                raise
            log.exception("prefill failed")
            failed.update(((id(seq.request), seq.prompt_index), str(exc)) for seq in group)
    return failed


def remember_group(engine, group: list[Sequence], done: list[Prefill]) -> None:
    """Stores a prefilled group's prompts in the engine's prefix cache and counts the tokens it served."""
    if engine.prefix_cache is not None:
        queried, hit = remember_prefixes(engine.prefix_cache, group, done)
        engine.stats.prefix_queried_tokens += queried
        engine.stats.prefix_hit_tokens += hit


def start_sequences(engine, seqs: list[Sequence]) -> None:
    """Starts prefilled sequences: their first token, then the running batch (unless that token ends them)."""
    started, prefills = [], []
    for seq in seqs:
        prefill = seq.request.take_prefill(seq)
        seq.prompt_logprobs = prefill.prompt_logprobs
        seq.cached_tokens = prefill.cached_tokens
        if seq.params.max_new_tokens == 0:  # only the prompt's logprobs were asked for
            engine.end(seq, "length")
        else:
            started.append(seq)
            prefills.append(prefill)
    if not started:
        return
    try:
        engine.batch.start(started, prefills)
    except Exception as exc:
        if not engine.running:  # rows prefilled in place are in the cache: empty it
            engine.batch.reset()
        engine.fail(started, exc, "choosing the first token failed")
