"""Cutting long text into pieces of at most N tokens, at paragraph, sentence, line or word boundaries, with overlap.

The cut is made in token space, so the budget is exact: the text is tokenized once (with character
offsets), each token start gets a boundary level, and each chunk ends at the best boundary in the back
half of its budget. Consecutive chunks share up to `overlap` tokens, starting at a sentence when one is
in reach, so a fact cut in two at a boundary is whole in one of the chunks. Chunks are slices of the
original text; together they cover every token (and every character) of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..tokenizer import Tokenizer
from .runner import TaskError

# How good a place a token start is for a chunk to begin (higher is better); MID_CHAR is never cut.
PARAGRAPH, SENTENCE, LINE, WORD, ANY, MID_CHAR = 4, 3, 2, 1, 0, -1
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n[ \t]*$")
_SENTENCE_END = re.compile(r"[.!?。！？][\"'”’)\]]*$")
# Tokens a template can add where it meets the text (BPE merges across the junction).
JUNCTION_MARGIN = 2


@dataclass
class Chunk:
    """A slice of a document: its text, its token span [start, end) and its character span."""

    text: str
    start: int
    end: int
    char_start: int
    char_end: int
    index: int = 0

    @property
    def tokens(self) -> int:
        """Returns the number of document tokens in the chunk."""
        return self.end - self.start


def token_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Returns (token ids, character offset where each token starts) of `text`."""
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    return list(enc.ids), [start for start, _ in enc.offsets]


def boundary_levels(text: str, starts: list[int]) -> list[int]:
    """Returns, per token, how good a place its start is to begin a chunk (PARAGRAPH ... ANY, MID_CHAR)."""
    levels = [PARAGRAPH] + [ANY] * (len(starts) - 1)
    for i in range(1, len(starts)):
        c = starts[i]
        if c == starts[i - 1]:  # a byte of the same character as the token before
            levels[i] = MID_CHAR
            continue
        before, here = text[max(0, c - 16) : c], text[c : c + 1]
        if _PARAGRAPH_END.search(before):
            levels[i] = PARAGRAPH
        elif before.endswith("\n"):
            levels[i] = LINE
        elif _SENTENCE_END.search(before) and (here.isspace() or not here):
            levels[i] = SENTENCE
        elif here.isspace() or before[-1:].isspace():
            levels[i] = WORD
    return levels


def split_text(text: str, tokenizer: Tokenizer, max_tokens: int, overlap: int = 0) -> list[Chunk]:
    """Returns chunks of at most max_tokens tokens covering `text`, consecutive ones sharing <= overlap tokens.

    overlap must be less than half of max_tokens (each chunk then advances at least that far).
    """
    if max_tokens < 1:
        raise TaskError(f"chunks must hold at least 1 token, got max_tokens={max_tokens}")
    if not 0 <= overlap < max(1, max_tokens // 2):
        raise TaskError(f"overlap={overlap} must be at least 0 and less than half of the chunk size ({max_tokens})")
    ids, starts = token_offsets(tokenizer, text)
    n = len(ids)
    if n == 0:
        return []
    if n <= max_tokens:
        return [Chunk(text, 0, n, 0, len(text))]
    levels = boundary_levels(text, starts)

    def char(i: int) -> int:
        return 0 if i == 0 else len(text) if i >= n else starts[i]

    chunks: list[Chunk] = []
    s = 0
    while True:
        e = min(n, s + max_tokens)
        if e < n:  # the best boundary in the back half: highest level, then latest
            e = max(range(s + max(1, max_tokens // 2), e + 1), key=lambda i: (levels[i] if i < n else PARAGRAPH, i))
        piece = text[char(s) : char(e)]
        # A cut inside a word can re-tokenize differently; shrink until the slice itself fits.
        while e > s + 1 and len(tokenizer.encode(piece)) > max_tokens:
            e -= 1
            piece = text[char(s) : char(e)]
        chunks.append(Chunk(piece, s, e, char(s), char(e), len(chunks)))
        if e >= n:
            return chunks
        nxt = e
        if overlap:  # the earliest sentence (or better) start within reach, else the best boundary, earliest
            lo = max(s + 1, e - overlap)
            nxt = max(range(lo, e), key=lambda i: (min(levels[i], SENTENCE), -i))
        s = max(nxt, s + 1)


def template_overhead(tokenizer: Tokenizer, template: str, **values) -> int:
    """Returns the tokens a template adds around the field left empty, plus a junction margin."""
    return len(tokenizer.encode(template.format(**values))) + JUNCTION_MARGIN
