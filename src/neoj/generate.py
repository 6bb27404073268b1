"""The decoding loop: batched prompts with left padding, a preallocated cache, streaming, stop strings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .cuda_graph import DecodeStep
from .errors import ContextLengthError
from .kv_cache import KVCache
from .model import Transformer, positions_from_valid
from .model_utils import fit_prompt, left_pad
from .sampling import GenerationParams, TokenSelector, check_logits
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class Completion:
    """One generated sequence: its text, tokens, log-probabilities and why it ended."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (stop string or EOS) or "length"
    prompt_tokens: int = 0
    prompt_index: int = 0


@dataclass
class StepEvent:
    """What one row produced in one decode step (text may be empty while a character or stop is pending)."""

    row: int
    text: str
    token_id: int
    logprob: float | None
    finished: bool


class _StopScanner:
    """Holds back text that could be the start of a stop string; finds a stop string when complete."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that begins some stop string
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _drain(decoder: StreamDecoder, scanner: _StopScanner) -> str:
    """Returns the text still held back when a row ends (a stop string in it still cuts it)."""
    text, hit = scanner.feed(decoder.flush())
    return text if hit else text + scanner.flush()


@torch.inference_mode()
def stream_batch(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]],
                 params: GenerationParams) -> Iterator[list[StepEvent]]:
    """Yields, after each decode step, the events of every row still running.

    Rows are the prompts each repeated num_return_sequences times. The finished Completions are in
    the generator's return value (`StopIteration.value`); `generate_batch` collects them.
    """
    params.validated()
    cfg = model.config
    device = model.wte.weight.device
    n = params.num_return_sequences
    rows: list[list[int]] = []
    prompt_index: list[int] = []
    for i, ids in enumerate(prompts):
        ids = ids or [tokenizer.eos_token_id]  # an empty prompt starts from <|endoftext|>, as GPT-2 does
        ids = fit_prompt(ids, params.max_new_tokens, cfg.n_positions, params.truncate)
        rows += [ids] * n
        prompt_index += [i] * n
    B = len(rows)
    results = [Completion(prompt_tokens=len(r), prompt_index=prompt_index[i],
                          logprobs=[] if params.logprobs is not None else None,
                          top_logprobs=[] if params.logprobs else None) for i, r in enumerate(rows)]
    if params.max_new_tokens == 0:
        for c in results:
            c.finish_reason = "length"
        return results

    seeds = [None if params.seed is None else params.seed + (i % n) for i in range(B)]
    selector = TokenSelector(params, B, cfg.vocab_size, min(tokenizer.vocab_size, cfg.vocab_size), device, seeds)
    for i, r in enumerate(rows):
        selector.observe_prompt(i, r)
    decoders = [StreamDecoder(tokenizer, skip_special_tokens=True) for _ in range(B)]
    scanners = [_StopScanner(params.stop) for _ in range(B)]
    done = [False] * B

    ids, valid = left_pad(rows, tokenizer.eos_token_id, device)
    positions = positions_from_valid(valid)
    cache = KVCache.for_model(model, B, ids.shape[1] + params.max_new_tokens)
    hidden = model(ids, positions, cache, valid if not bool(valid.all()) else None)
    logits = model.logits(hidden[:, -1])
    next_pos = positions[:, -1:] + 1
    decode_step = DecodeStep.for_cache(model, cache)  # a CUDA graph on GPUs; after the prefill, which it cannot run
    run_ahead = device.type == "cuda"  # kernels run asynchronously there: overlap each step with the host's work

    for step in range(params.max_new_tokens):
        logits = selector.mask_vocab(logits)
        check_logits(logits)
        tokens = selector.select(logits)
        selector.observe(tokens)
        logprobs = top = None
        if params.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            logprobs = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
            if params.logprobs:
                top = torch.topk(logp, params.logprobs, dim=-1)
                top = (top.indices.tolist(), top.values.tolist())
        last_step = step == params.max_new_tokens - 1
        if run_ahead and not last_step:
            # Queue the next step before this one's host work (detokenizing, stop strings, the caller's
            # code at the yield): the GPU computes while the CPU catches up. If every row then stops,
            # that step is simply dropped.
            token_list, next_logits = _tokens_then_next_step(tokens, lambda: decode_step(tokens, next_pos))
        else:
            token_list = tokens.tolist()
        events = []
        for i, tok in enumerate(token_list):
            if done[i]:
                continue
            c = results[i]
            c.token_ids.append(tok)
            if logprobs is not None:
                c.logprobs.append(logprobs[i])
                if top is not None:
                    c.top_logprobs.append(dict(zip(top[0][i], top[1][i])))
            if params.stop_at_eos and tok == tokenizer.eos_token_id:
                text, finished, c.finish_reason = _drain(decoders[i], scanners[i]), True, "stop"
            else:
                text, hit = scanners[i].feed(decoders[i].push(tok))
                finished = hit
                if hit:
                    c.finish_reason = "stop"
                elif last_step:
                    text += _drain(decoders[i], scanners[i])
                    finished, c.finish_reason = True, "length"
            c.text += text
            done[i] = finished
            events.append(StepEvent(i, text, tok, logprobs[i] if logprobs is not None else None, finished))
        yield events
        if all(done) or last_step:
            break
        logits = next_logits if run_ahead else decode_step(tokens, next_pos)
        next_pos = next_pos + 1
    return results


def _tokens_then_next_step(tokens: torch.Tensor, next_step) -> tuple[list[int], torch.Tensor]:
    """Returns (tokens as a list, next_step()): the tokens' copy to the host is queued first and waited
    for alone, so the next step's kernels are already queued when the host gets the tokens."""
    host = tokens.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tokens.device))
    logits = next_step()
    copied.synchronize()
    return host.tolist(), logits


def generate_batch(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]],
                   params: GenerationParams) -> list[Completion]:
    """Returns the Completions for token-id prompts (num_return_sequences per prompt, in order)."""
    gen = stream_batch(model, tokenizer, prompts, params)
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
    device = model.wte.weight.device
    x = torch.tensor([ids], device=device)
    hidden = model(x)[0, :-1]  # (T-1, C): position t predicts token t+1
    targets = x[0, 1:]
    out = []
    for s in range(0, hidden.shape[0], chunk):  # chunked so T x vocab fp32 logits never all exist at once
        logp = torch.log_softmax(model.logits(hidden[s : s + chunk]), dim=-1)
        out.append(logp.gather(1, targets[s : s + chunk, None]).squeeze(1))
    lp = torch.cat(out).tolist()
    return Score(list(ids), lp, float(sum(lp)))
