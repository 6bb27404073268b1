"""Speculative decoding: cheap guesses of the next tokens, verified by the model in one forward pass.

A proposer guesses up to `num_tokens` tokens per row: prompt lookup finds the last n-gram of the text earlier
in the prompt or output and proposes what followed it (no second model); a draft model (a smaller GPT-Neo, or a
quantized copy of the model) generates them. The running batch feeds each row its last token and its guesses
in one step and keeps the guesses the model would have chosen itself (greedy), or accepts them by rejection
sampling (sampled rows), so the output keeps the model's distribution (Leviathan et al. 2023; Chen et al. 2023).
The key/value slots of rejected guesses are rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NeojError

METHODS = ("prompt_lookup", "draft")


@dataclass
class Speculative:
    """How the engine speculates. method "prompt_lookup" (n-gram candidates from the prompt and the text so far)
    or "draft" (`draft`, a Transformer or LanguageModel sharing the tokenizer, proposes). num_tokens: guesses
    per step (0: the method's default). adaptive: turn speculation off while it does not pay (measured
    seconds per token with and without), trying it again now and then."""

    method: str = "prompt_lookup"
    num_tokens: int = 0
    draft: Any = None
    max_ngram: int = 3
    min_ngram: int = 1
    adaptive: bool = True

    DEFAULT_TOKENS = {"prompt_lookup": 5, "draft": 4}
    MAX_TOKENS = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise NeojError(f"speculative method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "draft" and self.draft is None:
            raise NeojError("speculative method 'draft' needs a draft model")
        if not 0 <= self.num_tokens <= self.MAX_TOKENS:
            raise NeojError(f"num_tokens={self.num_tokens} must be between 1 and {self.MAX_TOKENS} (0: default)")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise NeojError(f"n-gram sizes must satisfy 1 <= min_ngram ({self.min_ngram}) <= max_ngram "
                            f"({self.max_ngram})")
        if not self.num_tokens:
            self.num_tokens = self.DEFAULT_TOKENS[self.method]

    @classmethod
    def of(cls, value: "Speculative | str | None") -> "Speculative | None":
        """Returns the Speculative a library caller asked for: None, a Speculative, "prompt_lookup", or a draft
        Transformer / LanguageModel."""
        if value is None or isinstance(value, Speculative):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if hasattr(value, "model") or hasattr(value, "config"):
            return cls(method="draft", draft=value)
        raise NeojError(f"speculative={value!r} must be 'prompt_lookup', a draft model or a neoj.Speculative")
