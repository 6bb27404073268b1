"""Training data: read .txt / .jsonl files, tokenize, pack into fixed-length blocks, split off validation.

Every record is checked before any training starts; a bad one raises DataError naming the file and
line. Documents are packed back to back with <|endoftext|> after each, so no token is wasted on
padding except in the very last block. Each token carries a loss weight: 1 where the model should
learn to predict it, 0 for prompts of prompt/completion pairs and for padding.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NeojError
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(NeojError, ValueError):
    """Training data that cannot be read: the message names the file and line."""


@dataclass
class Document:
    """One training example: free text, or a prompt whose completion alone is learned."""

    text: str
    prompt: str | None = None
    where: str = ""


def _decode(path: Path, raw: bytes) -> str:
    """Returns the UTF-8 text of a file, or raises DataError naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_jsonl(path: Path, text: str) -> list[Document]:
    """Returns the documents of a JSON Lines file: {"text": ...} or {"prompt": ..., "completion": ...}."""
    docs: list[Document] = []
    kind = None  # "text" or "pair", fixed by the first record
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a \"text\" field or \"prompt\" and "
                            f"\"completion\" fields, got {type(record).__name__}")
        if kind is None:
            if "text" in record:
                kind = "text"
            elif "prompt" in record or "completion" in record:
                kind = "pair"
            else:
                raise DataError(f"{where}: missing field \"text\" (or \"prompt\" and \"completion\"); "
                                f"the record has {sorted(record)}")
        fields = ("text",) if kind == "text" else ("prompt", "completion")
        for name in fields:
            if name not in record:
                first = "\"text\" records" if kind == "text" else "\"prompt\"/\"completion\" pairs"
                raise DataError(f"{where}: missing field \"{name}\" (this file holds {first}, "
                                f"as its first record does)")
            if not isinstance(record[name], str):
                raise DataError(f"{where}: field \"{name}\" must be a string, got {type(record[name]).__name__}")
        if kind == "text":
            docs.append(Document(record["text"], where=where))
        else:
            if not record["completion"]:
                raise DataError(f"{where}: field \"completion\" is empty; there is nothing to learn")
            docs.append(Document(record["completion"], prompt=record["prompt"], where=where))
    return docs


def read_documents(path: str | Path) -> list[Document]:
    """Returns the documents of one data file (.txt: the whole file; .jsonl: one per line)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise DataError(f"{path}: directory holds no .txt or .jsonl files")
        return [doc for f in files for doc in read_documents(f)]
    if not path.exists():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    text = _decode(path, raw)
    if path.suffix.lower() in JSONL_SUFFIXES or path.suffix.lower() == ".json":
        docs = _read_jsonl(path, text)
    elif path.suffix.lower() in TEXT_SUFFIXES or not path.suffix:
        docs = [Document(text, where=str(path))]
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .txt or .jsonl "
                        "(records with \"text\", or \"prompt\" and \"completion\")")
    if not docs:
        raise DataError(f"{path}: file holds no records")
    return docs


def tokenize(docs: list[Document], tokenizer: Tokenizer) -> list[tuple[list[int], list[int] | None]]:
    """Returns (ids, weights) per document, <|endoftext|> appended; weights None means all ones."""
    eos = tokenizer.eos_token_id
    texts = tokenizer.encode_batch([d.text for d in docs])
    prompts_at = [i for i, d in enumerate(docs) if d.prompt is not None]
    prompts = tokenizer.encode_batch([docs[i].prompt for i in prompts_at]) if prompts_at else []
    out: list[tuple[list[int], list[int] | None]] = [(ids + [eos], None) for ids in texts]
    for i, p in zip(prompts_at, prompts):
        ids = out[i][0]
        out[i] = (p + ids, [0] * len(p) + [1] * len(ids))
    return out


@dataclass
class Blocks:
    """Packed training blocks: token ids (N, L) and per-token loss weights (N, L)."""

    ids: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        """Returns the number of tokens that count towards the loss (targets, not the first of a block)."""
        return int(self.weights[:, 1:].sum())


def pack(examples: list[tuple[list[int], list[int] | None]], block_size: int, eos: int) -> Blocks:
    """Returns the examples concatenated and cut into blocks of block_size; the last is padded."""
    ids = torch.tensor([t for ex, _ in examples for t in ex], dtype=torch.long)
    weights = torch.tensor([w for ex, ws in examples for w in (ws if ws is not None else [1] * len(ex))],
                           dtype=torch.uint8)
    n = max(1, math.ceil(len(ids) / block_size))
    pad = n * block_size - len(ids)
    if pad:
        ids = torch.cat([ids, torch.full((pad,), eos, dtype=torch.long)])
        weights = torch.cat([weights, torch.zeros(pad, dtype=torch.uint8)])
    return Blocks(ids.view(n, block_size), weights.view(n, block_size))


@dataclass
class Dataset:
    """The training and validation blocks of a run."""

    train: Blocks
    val: Blocks | None
    documents: int
    val_documents: int


def load_dataset(paths: list[str | Path], tokenizer: Tokenizer, block_size: int, val_fraction: float = 0.05,
                 seed: int = 0, val_paths: list[str | Path] | None = None) -> Dataset:
    """Returns the packed train/validation blocks of data files, validating every record first.

    Validation is held out by whole documents (chosen with `seed`) when there are several, so no text
    is in both splits; a single document gives its last blocks instead. `val_paths` overrides both.
    """
    if block_size < 2:
        raise DataError(f"sequence length must be at least 2 tokens, got {block_size}")
    docs = [d for p in paths for d in read_documents(p)]
    val_docs: list[Document] = [d for p in (val_paths or []) for d in read_documents(p)]
    eos = tokenizer.eos_token_id
    if not val_paths and val_fraction > 0 and len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:n_val])
        val_docs = [d for i, d in enumerate(docs) if i in held]
        docs = [d for i, d in enumerate(docs) if i not in held]
    train = pack(tokenize(docs, tokenizer), block_size, eos)
    val = pack(tokenize(val_docs, tokenizer), block_size, eos) if val_docs else None
    if val is None and not val_paths and val_fraction > 0 and len(train) >= 2:
        n_val = min(len(train) - 1, max(1, round(len(train) * val_fraction)))
        val = Blocks(train.ids[-n_val:].clone(), train.weights[-n_val:].clone())
        train = Blocks(train.ids[:-n_val].clone(), train.weights[:-n_val].clone())
    if train.tokens == 0:
        raise DataError("the training data has no tokens to learn from")
    log.info("data: %d documents, %d train blocks of %d tokens, %d validation blocks", len(docs), len(train),
             block_size, len(val) if val is not None else 0)
    return Dataset(train, val, len(docs), len(val_docs))


class BlockOrder:
    """The order blocks are visited in: a fresh seeded permutation each epoch, addressable by position.

    Position i (the i-th block drawn since the start of training) is block perm(i // n)[i % n], so a
    resumed run draws exactly the blocks an uninterrupted one would.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Returns the block indices at positions start .. start + count - 1."""
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in pos.div(self.n, rounding_mode="floor").unique().tolist():
            sel = pos // self.n == epoch
            out[sel] = self._perm(epoch)[pos[sel] % self.n]
        return out
