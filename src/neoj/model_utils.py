"""What every caller of the model shares: fitting prompts to the context, padding rows into a batch,
per-token log-probabilities, and mean-pooled embeddings.

generate, the engine, the tasks, training evaluation and the server all use these, so a limit, a padding
rule or a log-probability is computed one way everywhere.
"""

from __future__ import annotations

import torch

from .errors import ContextLengthError
from .model import Transformer

# Rows of fp32 logits (each vocabulary-wide) materialized at once when scoring many positions.
LOGPROB_CHUNK = 256


def fit_prompt(ids: list[int], max_new_tokens: int, n_positions: int, truncate: bool) -> list[int]:
    """Returns the prompt ids that fit the context with room for max_new_tokens, or raises ContextLengthError.

    With truncate, a prompt too long keeps its last tokens.
    """
    if max_new_tokens >= n_positions:
        raise ContextLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the {n_positions}-token context",
            len(ids), n_positions)
    if len(ids) + max_new_tokens <= n_positions:
        return ids
    if truncate:
        return ids[len(ids) + max_new_tokens - n_positions :]
    raise ContextLengthError(
        f"prompt has {len(ids)} tokens and {max_new_tokens} new tokens were asked for, "
        f"but the model's context is {n_positions} tokens; shorten the prompt, lower max_new_tokens, "
        "or ask for truncation (truncate=True / --truncate) to keep the last tokens",
        len(ids), n_positions)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ids, valid) of shape (B, width): rows right-aligned, so every row's next token is at the end."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        valid[i, width - len(r) :] = True
    return ids.to(device), valid.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    """Returns ids (B, width) with rows left-aligned. Under causal attention the padding after a row's end
    never reaches its real tokens, so no mask is needed (scoring and embedding use this)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device)


def token_logprobs(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor, top_n: int = 0,
                   chunk: int = LOGPROB_CHUNK) -> tuple[list[float], list[dict[int, float]] | None]:
    """Returns log P(targets[i] | hidden[i]) over the full output vocabulary for hidden states (N, C), and with
    top_n > 0 each position's top_n {token: logprob}.

    Chunked, so N x vocab fp32 logits never all exist at once. The full vocabulary (GPT-J's padding rows
    included) is what transformers and lm-eval score against.
    """
    values: list[float] = []
    tops: list[dict[int, float]] | None = [] if top_n else None
    for s in range(0, hidden.shape[0], chunk):
        logp = torch.log_softmax(model.logits(hidden[s : s + chunk]).float(), dim=-1)
        values += logp.gather(1, targets[s : s + chunk, None]).squeeze(1).tolist()
        if top_n:
            top = torch.topk(logp, top_n, dim=-1)
            tops += [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return values, tops


def mean_pooled(hidden: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Returns, per row of right-padded hidden states (B, T, C), the fp32 mean over its first lengths[b]
    positions: the embedding of a text."""
    return [hidden[b, :n].float().mean(dim=0) for b, n in enumerate(lengths)]


@torch.inference_mode()
def embed_rows(model: Transformer, rows: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Returns the mean-pooled final hidden state (C,) of each token-id row, computed in one padded forward."""
    hidden = model(right_pad(rows, pad_id, model.wte.weight.device))
    return [v.cpu() for v in mean_pooled(hidden, [len(r) for r in rows])]
