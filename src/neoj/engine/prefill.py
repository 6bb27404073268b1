"""Prefill: running new prompts through the model before their sequences join the running batch."""

from __future__ import annotations

import torch

from ..adapters import routed
from ..kv_cache import KVCache
from ..model import Transformer, positions_from_valid
from ..model_utils import left_pad, token_logprobs
from .request import Prefill
from .sequence import Sequence


def prefill_groups(seqs: list[Sequence], prefill_tokens: int) -> list[list[Sequence]]:
    """Returns seqs in groups to prefill together: by length, each at most prefill_tokens once padded."""
    groups: list[list[Sequence]] = []
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        if groups and (len(groups[-1]) + 1) * len(seq.prompt_ids) <= prefill_tokens:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def prefill(model: Transformer, seqs: list[Sequence], pad_id: int, cache: KVCache | None = None) -> list[Prefill]:
    """Runs the prompts of seqs in one left-padded forward; returns each one's Prefill (in the order of seqs).

    The keys and values go to `cache` (row i for seqs[i], from slot 0: the running batch's own cache, made
    ready by BatchCache.begin) or to a new cache of their own. Each Prefill is shared by the copies of its
    prompt (num_return_sequences), and with prompt logprobs asked for it holds (logprob, top N) per prompt token.
    """
    rows = [seq.prompt_ids for seq in seqs]
    ids, valid = left_pad(rows, pad_id, model.wte.weight.device)
    width = ids.shape[1]
    cache = cache if cache is not None else KVCache.for_model(model, len(rows), width)
    padded = any(len(r) != width for r in rows)
    positions = positions_from_valid(valid) if padded else None
    with routed(model, [seq.params.adapter for seq in seqs]):  # each prompt's LoRA adapter, if any
        hidden = model(ids, positions, cache, valid if padded else None)
    last = model.logits(hidden[:, -1])
    out = []
    for i, seq in enumerate(seqs):
        top_n = seq.request.prompt_logprobs
        plp = prompt_logprobs(model, hidden[i, width - len(seq.prompt_ids) : -1], seq.prompt_ids, top_n) \
            if top_n is not None else None
        out.append(Prefill(cache, i, width, last[i : i + 1], plp, seq.params.num_return_sequences))
    return out


def prompt_logprobs(model: Transformer, hidden: torch.Tensor, ids: list[int], top_n: int) -> list:
    """Returns [(logprob, top N) per prompt token]; the first token has none (nothing precedes it).

    Over the full output vocabulary, as LanguageModel.score and transformers compute them, so scores served
    to lm-eval match local ones (GPT-J's padding rows are not masked here).
    """
    targets = torch.tensor(ids[1:], device=hidden.device)
    values, tops = token_logprobs(model, hidden, targets, top_n)
    return [(None, None)] + list(zip(values, tops if tops is not None else [None] * len(values)))
