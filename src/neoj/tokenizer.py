"""The GPT-2 byte-level BPE tokenizer through HF `tokenizers`, and a UTF-8-safe streaming decoder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .errors import CheckpointError

EOS_TEXT = "<|endoftext|>"


def bundled_gpt2_dir() -> Path:
    """Returns the directory of the GPT-2 vocab.json + merges.txt shipped inside neoj."""
    return Path(str(resources.files("neoj") / "assets" / "gpt2"))


class Tokenizer:
    """Encodes text to GPT-2 token ids and back."""

    def __init__(self, backend: HFTokenizer, eos_token_id: int = 50256):
        self.backend = backend
        self.eos_token_id = eos_token_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: str | Path | None = None) -> "Tokenizer":
        """Returns the tokenizer of a checkpoint directory: tokenizer.json, else vocab.json + merges.txt,
        else the GPT-2 tokenizer shipped with neoj (GPT-Neo and GPT-J both use it)."""
        directory = Path(directory) if directory is not None else bundled_gpt2_dir()
        tokenizer_json = directory / "tokenizer.json"
        if tokenizer_json.exists():
            try:
                return cls(HFTokenizer.from_file(str(tokenizer_json)))
            except Exception as exc:  # tokenizers raises a bare Exception on a bad file
                raise CheckpointError(f"{tokenizer_json} could not be read: {exc}") from exc
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            vocab, merges = bundled_gpt2_dir() / "vocab.json", bundled_gpt2_dir() / "merges.txt"
        return cls(_byte_level_bpe(vocab, merges))

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text` (no BOS is added, as for GPT-2)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """Returns (token id, start, end) per token: the character span of `text` each token came from."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return [(tid, start, end) for tid, (start, end) in zip(encoding.ids, encoding.offsets)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Returns token ids for several texts, encoded in parallel."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Returns the text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Returns one token's text as it would print (bytes of partial characters shown as U+FFFD)."""
        return self.backend.decode([token_id])

    def save(self, directory: str | Path) -> None:
        """Writes tokenizer.json (readable by transformers and tokenizers) into `directory`."""
        self.backend.save(str(Path(directory) / "tokenizer.json"))


def _byte_level_bpe(vocab: Path, merges: Path) -> HFTokenizer:
    """Returns GPT-2's byte-level BPE, configured as transformers' GPT2TokenizerFast configures it."""
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:
        raise CheckpointError(f"could not read tokenizer files {vocab} and {merges}: {exc}") from exc
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    return tok


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces; never emits half a UTF-8 character.

    Decodes a short window of recent tokens and emits only the new, complete part: a character that
    spans several byte-level tokens appears once its last byte has arrived.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window that gives context for decoding
        self.read_offset = 0  # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text it completes (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Returns whatever is still held back (an incomplete character at the very end)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
