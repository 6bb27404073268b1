"""Prefill: running new prompts through the model before their sequences join the running batch.

A prompt that starts with blocks of the prefix cache reuses their keys and values and runs only the rest.
The rows of one prefill stay right-aligned (padding only on the left, as the running batch needs them): every
row runs the same number T of new tokens, the most any of them needs beyond its cached prefix, so a row that
needs fewer runs the last cached tokens again as ordinary input and reuses only the tokens before them.

Scoring (score_rows_with_prefix: the tasks' continuation log-likelihoods, a few-shot prompt before each
text) reuses the prefix cache the same way, from the other side: its rows are right-padded (nothing is
generated after them) and all reuse the same number of cached tokens, the fewest any of them has.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..adapters import routed
from ..kv_cache import KVCache
from ..model import Transformer, positions_from_valid
from ..model_utils import left_pad, right_pad, token_logprobs
from .prefix_cache import PrefixCache, PrefixHit
from .request import Prefill
from .sequence import Sequence


def prefill_groups(seqs: list[Sequence], prefill_tokens: int,
                   cached: Mapping[Sequence, int] | None = None) -> list[list[Sequence]]:
    """Returns seqs in groups to prefill together: by the tokens each must run (its prompt less the `cached`
    prefix it can reuse), each group at most prefill_tokens once padded.

    Every row of a group runs as many tokens as its longest run, so a row with a shorter run recomputes the end
    of its cached prefix. A prompt joins a group only while every prompt there keeps at least half of its cached
    prefix, so a long uncached prompt does not undo the cache hits of the short runs before it. Without cached
    prefixes, groups are as long as the budget allows.
    """
    cached = cached or {}

    def run(seq: Sequence) -> int:
        return len(seq.prompt_ids) - cached.get(seq, 0)

    def fits(group: list[Sequence], width: int) -> bool:
        return (len(group) + 1) * width <= prefill_tokens and \
            all(2 * (width - run(s)) <= cached.get(s, 0) for s in group if s in cached)

    groups: list[list[Sequence]] = []
    for seq in sorted(seqs, key=run):
        if groups and fits(groups[-1], run(seq)):
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def prefill(model: Transformer, seqs: list[Sequence], pad_id: int, cache: KVCache | None = None,
            prefixes: list[PrefixHit | None] | None = None) -> list[Prefill]:
    """Runs the prompts of seqs in one left-padded forward; returns each one's Prefill (in the order of seqs).

    The keys and values go to `cache` (row i for seqs[i], from slot 0: the running batch's own cache, made
    ready by BatchCache.begin) or to a new cache of their own. prefixes[i], when given, holds cached keys and
    values of seqs[i]'s first tokens (ignored for a prompt whose logprobs are asked for: every position must
    run); Prefill.cached_tokens says how many were reused. Each Prefill is shared by the copies of its prompt
    (num_return_sequences), and with prompt logprobs asked for it holds (logprob, top N) per prompt token.
    """
    prefixes = prefixes or [None] * len(seqs)
    hits = [hit if seq.request.prompt_logprobs is None else None for seq, hit in zip(seqs, prefixes)]
    reused = reused_tokens([len(seq.prompt_ids) for seq in seqs], [hit.tokens if hit else 0 for hit in hits])
    start = max(reused)
    rows = [seq.prompt_ids[u:] for seq, u in zip(seqs, reused)]
    device = model.wte.weight.device
    ids, valid = left_pad(rows, pad_id, device)
    width = ids.shape[1]
    cache = cache if cache is not None else KVCache.for_model(model, len(rows), start + width)
    padded = any(len(r) != width for r in rows)
    positions = positions_from_valid(valid) if padded else None
    if start:
        load_prefixes(cache, hits, reused, start)
        offsets = torch.tensor(reused, device=device)[:, None]
        positions = (positions if positions is not None else torch.arange(width, device=device)) + offsets
    with routed(model, [seq.params.adapter for seq in seqs]):  # each prompt's LoRA adapter, if any
        hidden = model(ids, positions, cache, valid if padded else None)
    last = model.logits(hidden[:, -1])
    out = []
    for i, seq in enumerate(seqs):
        top_n = seq.request.prompt_logprobs
        plp = prompt_logprobs(model, hidden[i, width - len(seq.prompt_ids) : -1], seq.prompt_ids, top_n) \
            if top_n is not None else None
        out.append(Prefill(cache, i, start + width, last[i : i + 1], plp, seq.params.num_return_sequences, reused[i]))
    return out


def look_up_prefixes(prefix_cache: PrefixCache, prompts: list[Sequence]) -> dict[Sequence, PrefixHit]:
    """Returns the cached prefix each new prompt starts with, where it has one. Prompts whose logprobs are
    asked for look up nothing: every prompt position must run to give them."""
    hits: dict[Sequence, PrefixHit] = {}
    for seq in prompts:
        if seq.request.prompt_logprobs is None:
            hit = prefix_cache.lookup(seq.prompt_ids, seq.params.adapter)
            if hit is not None:
                hits[seq] = hit
    return hits


def remember_prefixes(prefix_cache: PrefixCache, group: list[Sequence], done: list[Prefill]) -> tuple[int, int]:
    """Stores the full blocks of every prefilled prompt of a group (from its prefill's cache row) for the prompts
    that follow, and counts the group's use of the cache; returns (tokens looked up, tokens reused)."""
    queried = hit = 0
    for seq, result in zip(group, done):
        n = len(seq.prompt_ids)
        if seq.request.prompt_logprobs is None:
            prefix_cache.record(n, result.cached_tokens)
            queried, hit = queried + n, hit + result.cached_tokens
        slots = slice(result.end - n, result.end)
        prefix_cache.store(seq.prompt_ids, seq.params.adapter, result.cache.k[:, result.row, :, slots],
                           result.cache.v[:, result.row, :, slots])
    return queried, hit


def reused_tokens(lengths: list[int], cached: list[int]) -> list[int]:
    """Returns how many cached tokens each prompt reuses when prefilled together: every row runs T tokens, the
    most any prompt has beyond its cached prefix, so prompt i reuses its first max(0, lengths[i] - T)."""
    run = max(n - c for n, c in zip(lengths, cached))
    return [max(0, n - run) for n in lengths]


def load_prefixes(cache: KVCache, hits: list[PrefixHit | None], reused: list[int], start: int) -> None:
    """Writes each row's reused prefix into its cache row, right-aligned to end at slot `start` (positions from
    0), marks the slots before it as padding and sets the cache to continue at `start`."""
    device = cache.key_pos.device
    for i, (hit, n) in enumerate(zip(hits, reused)):
        cache.key_valid[i, : start - n] = False
        cache.key_valid[i, start - n : start] = True
        if n:
            kv = hit.keys_values(n)
            cache.k[:, i, :, start - n : start] = kv[0]
            cache.v[:, i, :, start - n : start] = kv[1]
            cache.key_pos[i, start - n : start] = torch.arange(n, device=device)
    cache.length = start
    cache.padded = cache.padded or min(reused) < start


def prompt_logprobs(model: Transformer, hidden: torch.Tensor, ids: list[int], top_n: int) -> list:
    """Returns [(logprob, top N) per prompt token]; the first token has none (nothing precedes it).

    Over the full output vocabulary, as LanguageModel.score and transformers compute them, so scores served
    to lm-eval match local ones (GPT-J's padding rows are not masked here).
    """
    targets = torch.tensor(ids[1:], device=hidden.device)
    values, tops = token_logprobs(model, hidden, targets, top_n)
    return [(None, None)] + list(zip(values, tops if tops is not None else [None] * len(values)))


def score_rows_with_prefix(model: Transformer, prefix_cache: PrefixCache, rows: list[tuple[list[int], int]],
                           pad_id: int) -> list[float]:
    """Returns, per (ids, n) row, the summed log-probability of its last n tokens, as one right-padded forward
    over whole rows does, but reusing the prefix cache: the rows reuse the keys and values of their first
    `start` tokens (the shortest cached prefix among their contexts, ids less the last n: the context's last
    token must run to predict the first scored one), run only the rest, then store their contexts' full blocks
    for the rows that follow (a task's few-shot examples are computed once). Rows run on the base model
    (no LoRA adapter routed), so lookups and stores use adapter None.
    """
    contexts = [ids[: len(ids) - n] for ids, n in rows]
    hits = [prefix_cache.lookup(ctx) for ctx in contexts]
    start = min(hit.tokens if hit is not None else 0 for hit in hits)
    cache = KVCache.for_model(model, len(rows), max(len(ids) for ids, _ in rows))
    if start:
        load_prefixes(cache, hits, [start] * len(rows), start)
    x = right_pad([ids[start:] for ids, _ in rows], pad_id, model.wte.weight.device)
    hidden = model(x, cache=cache)  # positions continue from `start`; padding after a row never reaches it
    out = continuation_sums(model, hidden, x, rows, start)
    for i, ctx in enumerate(contexts):
        prefix_cache.record(len(rows[i][0]), start)
        prefix_cache.store(ctx, None, cache.k[:, i, :, : len(ctx)], cache.v[:, i, :, : len(ctx)])
    return out


def continuation_sums(model: Transformer, hidden: torch.Tensor, x: torch.Tensor, rows: list[tuple[list[int], int]],
                      offset: int = 0) -> list[float]:
    """Returns, per (ids, n) row, the summed log-probability of its last n tokens, from the hidden states
    (B, T, C) of input x (B, T): row b's tokens from `offset` on (those before it came from a cache).

    Position t predicts token t + 1, so a continuation of n tokens ending at len is predicted from the hidden
    states at len-n-1 .. len-2, which are at input index t - offset.
    """
    device = x.device
    b_idx = torch.tensor([b for b, (ids, n) in enumerate(rows) for _ in range(n)], device=device)
    t_idx = torch.tensor([t - offset for ids, n in rows for t in range(len(ids) - n - 1, len(ids) - 1)],
                         device=device)
    lps, _ = token_logprobs(model, hidden[b_idx, t_idx], x[b_idx, t_idx + 1])
    out, k = [], 0
    for _, n in rows:
        out.append(float(sum(lps[k : k + n])))
        k += n
    return out
