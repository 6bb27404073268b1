"""Matching generated tokens against a Constraint with llguidance: one Matcher per generated row, the masks of
allowed tokens it computes, and applying them to a batch's logits.

llguidance needs the bytes of every token: it reads them from neoj's tokenizer (its `tokenizers` JSON), once
per vocabulary (about a second for GPT-2's 50257 tokens). A mask is a bitmask, one bit per token in int32 words,
computed in Rust with the GIL released, when the sampler asks for it. A Matcher can instead start computing its
next mask on a small thread pool as soon as a token is committed (PREFETCH), to overlap it with the model's next
step; bench/bench_constrained.py measured no gain on CPU (a mask costs 30-130 µs, a step milliseconds) and on
CUDA the host computes the masks while the GPU runs anyway, so it is off.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .constraint import Constraint, ConstraintError
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Compute each row's next mask on a pool thread as soon as its token is committed (True), or only when the
# sampler asks for it (False, the default: no faster, see the module docstring). bench/bench_constrained.py
# measures both (BENCHMARKS.md, bench_constrained).
PREFETCH = False

_lock = threading.Lock()
_ll_tokenizers: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()
_by_definition: dict[tuple[str, int, int], object] = {}  # the same vocabulary in another Tokenizer object
_templates: "OrderedDict[tuple[int, str], object]" = OrderedDict()  # compiled matchers, copied per row
TEMPLATES_KEPT = 32
_pool: ThreadPoolExecutor | None = None


def ll_tokenizer(tokenizer: Tokenizer):
    """Returns the llguidance LLTokenizer of a neoj Tokenizer, built once per vocabulary (about a second) and
    remembered per Tokenizer object."""
    from llguidance import LLTokenizer

    with _lock:
        found = _ll_tokenizers.get(tokenizer)
        if found is None:
            key = (tokenizer.backend.to_str(), tokenizer.vocab_size, tokenizer.eos_token_id)
            found = _by_definition.get(key)
            if found is None:
                found = _by_definition[key] = LLTokenizer(key[0], n_vocab=key[1], eos_token=key[2])
            _ll_tokenizers[tokenizer] = found
        return found


def _compiled(tokenizer: Tokenizer, constraint: Constraint):
    """Returns a fresh llguidance LLMatcher for the constraint: a copy of one compiled earlier when there is one."""
    from llguidance import LLMatcher

    lt = ll_tokenizer(tokenizer)
    key = (id(lt), constraint.grammar)
    with _lock:
        template = _templates.get(key)
        if template is not None:
            _templates.move_to_end(key)
            return template.deep_copy()
    matcher = LLMatcher(lt, constraint.grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"invalid {constraint.kind} constraint: {matcher.get_error().strip().splitlines()[0]}")
    with _lock:
        _templates[key] = matcher.deep_copy()
        while len(_templates) > TEMPLATES_KEPT:
            _templates.popitem(last=False)
    return matcher


def _executor() -> ThreadPoolExecutor:
    """Returns the pool that computes prefetched masks (a few threads: llguidance releases the GIL)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="neoj-mask")
        return _pool


class Matcher:
    """One row's position in its constraint: commits the row's tokens and gives the mask of the next ones allowed.

    Not thread-safe by itself: the engine commits a token only after it has read the mask for that step, so a
    prefetched mask never races with a commit.
    """

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer):
        if not isinstance(constraint, Constraint):
            raise ConstraintError(f"constraint must be a neoj.constraint.Constraint, not {type(constraint).__name__}")
        self.constraint = constraint
        self.matcher = _compiled(tokenizer, constraint)
        self.eos_token_id = tokenizer.eos_token_id
        self.words = torch.empty((ll_tokenizer(tokenizer).vocab_size + 31) // 32, dtype=torch.int32)
        self.pending: Future | None = None
        self.ready = False  # self.words holds the mask of the current state
        self.prefetch()

    def commit(self, token: int) -> bool:
        """Advances past `token`; returns False when the constraint does not allow it (the matcher is then broken)."""
        self._wait()
        self.ready = False
        return self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """Returns True when the text is complete and nothing more may follow (only EOS would be allowed)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        """Returns llguidance's reason the matcher broke (a token it refused, a parser limit); "" when it did not."""
        return self.matcher.get_error()

    def prefetch(self) -> None:
        """Starts computing the next mask on a pool thread, when PREFETCH is on."""
        if PREFETCH and self.pending is None and not self.ready:
            self.pending = _executor().submit(self._fill)

    def mask(self) -> torch.Tensor:
        """Returns the next token's allowed-token bitmask (words,) int32, one bit per token, computing it if needed."""
        self._wait()
        if not self.ready:
            self._fill()
        return self.words

    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        if self.matcher.is_error():  # a parser limit hit while computing: let the row end on EOS, reported then
            self.words.zero_()
            self.words.view(torch.uint8)[self.eos_token_id // 8] = 1 << (self.eos_token_id % 8)  # little-endian
        self.ready = True

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


BITS = torch.arange(32, dtype=torch.int32)


def disallowed_tokens(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """Returns the bool mask (B, vocab), True where a token is not allowed, of bitmasks (B, words) int32 (bit j of
    word i is token 32 i + j); tokens past the bitmask (an embedding padded beyond the tokenizer, as GPT-J's) are
    never allowed. On CPU numpy's unpackbits does it (20x faster than torch's shifts there); on a GPU, shifts.
    """
    if words.device.type == "cpu":
        packed = (~words).numpy().view(np.uint8)  # little-endian words: byte k of word i holds tokens 32 i + 8 k ..
        banned = torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little").view(np.bool_))
    else:
        banned = (((~words).unsqueeze(-1) >> BITS.to(words.device)) & 1).view(words.shape[0], -1).bool()
    if banned.shape[1] >= vocab:
        return banned[:, :vocab]
    return torch.nn.functional.pad(banned, (0, vocab - banned.shape[1]), value=True)


def apply_masks(logits: torch.Tensor, rows: list[int], matchers: list[Matcher]) -> None:
    """Sets, in place, the logits (B, V) of the tokens row rows[i]'s constraint does not allow next to -inf."""
    words = torch.stack([m.mask() for m in matchers]).to(logits.device)
    banned = disallowed_tokens(words, logits.shape[1])
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(banned, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(banned, float("-inf"))
