"""Generation parameters and the math of next-token selection (penalties, warpers, the NaN check), with
transformers' semantics for each knob; engine.Sampler applies them to a running batch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch

from .errors import GenerationError

if TYPE_CHECKING:
    from .constraint import Constraint

# Temperatures below this are greedy decoding. Sampling at temperature T weighs a token exp(-gap / T) against
# the best one: at T = 1e-5 a logit gap of 1e-3 already weighs exp(-100), so sampling would pick the argmax
# anyway, while dividing logits by smaller temperatures (1e-45, 5e-324 reach float32 as 0) overflows to inf
# and NaN. vLLM draws the same line (its _SAMPLING_EPS is 1e-5).
GREEDY_TEMPERATURE = 1e-5
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


@dataclass
class GenerationParams:
    """What to generate and how. temperature=0 means greedy, as in the OpenAI API; so does any temperature
    below GREEDY_TEMPERATURE (1e-5), where sampling could only pick the most likely token."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # transformers' (CTRL) penalty over prompt and output; 1.0 = off
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # the stop text itself is not returned
    stop_at_eos: bool = True
    seed: int | None = None
    num_return_sequences: int = 1
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: also the top N alternatives
    truncate: bool = False  # keep the last tokens of a too-long prompt instead of raising
    min_p: float = 0.0  # keep tokens at least min_p x the best one's probability; 0.0 = off
    typical_p: float = 1.0  # locally typical sampling's mass; 1.0 = off
    logit_bias: dict[int, float] | None = None  # OpenAI's: token id -> bias added to its logit, in [-100, 100]
    constraint: "Constraint | None" = None  # structured output: the text must match it (neoj.constraint)
    adapter: str | None = None  # the LoRA adapter (by its served name) this generation runs with; None: the base
    speculative: bool = True  # False: never speculate for this request, even where the engine does

    @property
    def greedy(self) -> bool:
        """Returns True when decoding picks the most likely token (temperature below GREEDY_TEMPERATURE)."""
        return self.temperature < GREEDY_TEMPERATURE

    def validated(self) -> "GenerationParams":
        """Returns self after checking every field is in range; raises GenerationError naming the bad one.

        Every accepted value generates: tiny temperatures are greedy, and the samplers keep huge temperatures
        and extreme repetition penalties finite (see penalize and sampling_probs). NaN and infinity are refused.
        """
        floats = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise GenerationError(f"{name}={value!r} must be a finite number")
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 disables it)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("num_return_sequences", self.num_return_sequences >= 1, "must be >= 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise GenerationError(f"{name}={getattr(self, name)!r} {why}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop sequences must be non-empty strings")
        self._check_warpers()
        return self

    def _check_warpers(self) -> None:
        """Checks min_p, typical_p and logit_bias (whose digit-string keys, as JSON sends them, become ints)."""
        for name, low_open in (("min_p", False), ("typical_p", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise GenerationError(f"{name}={value!r} must be a finite number")
            if not (0 < value <= 1 if low_open else 0 <= value <= 1):
                raise GenerationError(f"{name}={value!r} must be in {'(0' if low_open else '[0'}, 1]")
        if self.logit_bias is not None:
            self.logit_bias = checked_logit_bias(self.logit_bias)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationParams":
        """Returns params from keyword arguments, rejecting unknown names with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise GenerationError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in kwargs.items() if v is not None}).validated()


MAX_LOGIT_BIAS_ENTRIES = 300  # as OpenAI's API


def checked_logit_bias(bias: object) -> dict[int, float]:
    """Returns OpenAI's logit_bias as {token id: bias}; raises GenerationError naming logit_bias for a bad entry.

    Keys are token ids >= 0, as ints or as digit strings (JSON object keys are strings); values are finite numbers
    in [-100, 100]; at most 300 entries. Whether an id is inside the vocabulary is the engine's check (it knows it).
    """
    if not isinstance(bias, dict):
        raise GenerationError(f"logit_bias={bias!r} must be a mapping of token ids to biases")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise GenerationError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed")
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.isascii() and key.isdigit():
            token = int(key)
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool) and key >= 0:
            token = int(key)
        else:
            raise GenerationError(f"logit_bias key {key!r} must be a token id (an integer >= 0)")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -100 <= value <= 100:
            raise GenerationError(f"logit_bias[{key!r}]={value!r} must be a number in [-100, 100]")
        if token in out:
            raise GenerationError(f"logit_bias names token {token} twice")
        out[token] = float(value)
    return out


def penalize(scores: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
             p: GenerationParams) -> torch.Tensor:
    """Returns scores (B, V) or (V,) after p.logit_bias, the repetition penalty on `seen` tokens and the presence
    and frequency penalties on `counts`; scores itself when none applies. The one definition both samplers use.

    transformers' (CTRL) repetition penalty divides a seen token's positive logit by the penalty and multiplies
    a negative one. A finite logit stays finite whatever the penalty: 1e-300 reaches float32 as 0 (x / 0 = inf)
    and 1e300 as inf, so the penalty is clamped to float32's normal range and the results to its finite range;
    a penalized token then wins (or loses) against every other, the limit those penalties tend to. -inf
    (masked vocabulary) stays -inf.
    """
    if seen is None and counts is None and not p.logit_bias:
        return scores
    if p.logit_bias:  # OpenAI's: added to the model's logits before every other adjustment
        ids = torch.tensor(list(p.logit_bias), device=scores.device)
        bias = torch.tensor(list(p.logit_bias.values()), dtype=scores.dtype, device=scores.device)
        scores = scores.index_add(-1, ids, bias.expand(*scores.shape[:-1], len(ids)))
    if seen is not None:
        rp = min(max(p.repetition_penalty, FLOAT32_TINY), FLOAT32_MAX)
        penalized = torch.where(scores < 0, scores * rp, scores / rp).clamp(-FLOAT32_MAX, FLOAT32_MAX)
        scores = torch.where(seen & torch.isfinite(scores), penalized, scores)
    if counts is not None:
        scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return scores


def sampling_probs(scores: torch.Tensor, params: list[GenerationParams]) -> torch.Tensor:
    """Returns each row's sampling distribution (B, V) after top-k, temperature, top-p, min-p and typical-p,
    row i under params[i]; a row whose knob is off is not touched by that warper.

    The order is transformers' (_get_logits_processor: temperature, top-k, top-p, min-p, typical), except that
    top-k picks before the temperature: the same tokens, as dividing by a temperature keeps their order, but a
    huge temperature may flatten the scores to ties. Each row is first shifted so that its best score is 0:
    softmax does not change, and dividing by the temperature can then only push scores towards -inf, never
    overflow to +inf or NaN (a penalized score near float32's limit, or a temperature near GREEDY_TEMPERATURE).
    Temperatures are clamped to float32's finite range, so a huge one (1e300 reaches float32 as inf, and
    -inf / inf is NaN) gives the uniform distribution over the tokens top-k keeps. Every warper keeps at least one
    token (transformers' min_tokens_to_keep=1), so every row has one to sample.
    """
    scores = scores - scores.amax(dim=-1, keepdim=True)
    scores = _top_k(scores, [p.top_k for p in params])
    temps = torch.tensor([min(max(p.temperature, GREEDY_TEMPERATURE), FLOAT32_MAX) for p in params],
                         dtype=torch.float32, device=scores.device)
    scores = scores / temps[:, None]
    scores = _top_p(scores, [p.top_p for p in params])
    scores = _min_p(scores, [p.min_p for p in params])
    scores = _typical_p(scores, [p.typical_p for p in params])
    return scores.softmax(dim=-1)


def _rows(values: list, device: torch.device) -> torch.Tensor:
    """Returns a (B, 1) bool tensor: which rows `values` marks (a list of bools)."""
    return torch.tensor(values, device=device)[:, None]


def _top_k(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Returns scores with each row's tokens below its k-th best at -inf (ties with it kept, as transformers)."""
    if not any(ks):
        return scores
    kmax = min(max(ks), scores.shape[-1])
    top = torch.topk(scores, kmax, dim=-1).values
    kth = top.gather(1, torch.tensor([[min(k, kmax) - 1 if k else 0] for k in ks], device=scores.device))
    kth = kth.masked_fill(_rows([k == 0 for k in ks], scores.device), float("-inf"))
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: torch.Tensor, tps: list[float]) -> torch.Tensor:
    """Returns scores with the least likely tokens outside each row's top_p mass at -inf (TopPLogitsWarper)."""
    if all(tp >= 1.0 for tp in tps):
        return scores
    device = scores.device
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - torch.tensor(tps, dtype=torch.float64, device=device)).float()[:, None]
    remove &= ~_rows([tp >= 1.0 for tp in tps], device)
    remove[:, -1] = False  # always keep the most likely token
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def _min_p(scores: torch.Tensor, mps: list[float]) -> torch.Tensor:
    """Returns scores with the tokens less likely than min_p x the best one's probability at -inf
    (MinPLogitsWarper); min_p=0 removes nothing, min_p=1 keeps the best token and its ties."""
    if not any(mps):
        return scores
    probs = scores.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(mps, dtype=probs.dtype, device=probs.device)[:, None]
    remove = probs < threshold
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)  # the best token stays, whatever rounding did
    return scores.masked_fill(remove, float("-inf"))


def _typical_p(scores: torch.Tensor, masses: list[float]) -> torch.Tensor:
    """Returns scores with only each row's locally typical tokens finite (TypicalLogitsWarper): those whose
    surprisal is closest to the distribution's entropy, up to typical_p of the probability mass."""
    if all(m >= 1.0 for m in masses):
        return scores
    device = scores.device
    normalized = torch.log_softmax(scores, dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)  # -inf x 0 is NaN: masked tokens
    shifted = torch.abs(-normalized - entropy)
    sorted_shifted, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    mass = torch.tensor(masses, dtype=cumulative.dtype, device=device)[:, None]
    last = (cumulative < mass).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    remove = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    remove[:, 0] = False  # the most typical token stays
    remove &= ~_rows([m >= 1.0 for m in masses], device)
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class NumericalError(GenerationError):
    """The model's logits hold NaN or +inf: its activations overflowed the dtype, or the weights are broken."""


def check_logits(logits: torch.Tensor) -> None:
    """Raises NumericalError if any logit is NaN or +inf, or a row has no finite logit.

    -inf is legitimate (masked vocabulary rows); NaN or +inf mean the forward pass overflowed, and
    sampling from them would silently produce garbage. It runs every step, so the common case is one pass:
    each row's maximum is finite exactly when the row holds no NaN (max propagates it), no +inf, and at least
    one finite logit. Only otherwise do the elementwise tests run, to name the rows.
    """
    if bool(torch.isfinite(logits.amax(dim=-1)).all()):
        return
    if bool(torch.isnan(logits).any() | torch.isposinf(logits).any() | ~torch.isfinite(logits).any(dim=-1).all()):
        rows = sorted({int(r) for r in torch.nonzero(~torch.isfinite(logits) & (logits != float("-inf")))[:, 0]})
        raise NumericalError(
            f"the model produced NaN/inf logits (batch rows {rows[:8] or 'all'}): its activations overflowed "
            "the compute dtype or the weights hold NaN/inf. GPT-Neo overflows float16 on long inputs; load with "
            "dtype bfloat16 or float32 (--dtype), and check the checkpoint")


def speculative_accept(probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[int, int]:
    """Returns (guesses accepted, the token after them) for one row's guesses, by rejection sampling.

    probs (k+1, V) is the model's sampling distribution after each of the k guesses' prefixes (row j: after
    guesses 0..j-1); draft_probs (k, V) the distributions the guesses were drawn from, or None for guesses that
    were certain (prompt lookup). Guess j is accepted with probability min(1, p(guess) / q(guess)); at the first
    rejection the next token is drawn from max(0, p - q), normalized; if all are accepted, from probs[k]. Every
    emitted token then has the model's own distribution (Leviathan et al. 2023, Chen et al. 2023).
    """
    k = len(drafts)
    device = probs.device
    if k:
        index = torch.tensor(drafts, device=device)[:, None]
        p = probs[:k].gather(1, index)[:, 0]
        q = draft_probs[:k].gather(1, index)[:, 0] if draft_probs is not None else torch.ones_like(p)
        u = torch.rand(k, generator=generator, device=device)
        rejected = (u * q >= p).tolist()  # accepted when u < p / q
        accepted = rejected.index(True) if True in rejected else k
    else:
        accepted = 0
    dist = probs[accepted]
    if accepted < k:
        if draft_probs is not None:
            residual = (dist - draft_probs[accepted]).clamp(min=0)
        else:
            residual = dist.clone()
            residual[drafts[accepted]] = 0
        if float(residual.sum()) > 0:  # else p <= q everywhere: only rounding can get here
            dist = residual
    return accepted, int(torch.multinomial(dist, 1, generator=generator))
