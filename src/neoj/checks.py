"""Checks of what a user hands neoj, made before any model is loaded, each failing with one NeojError line.

Text: prompts, stop strings and documents must be UTF-8. Bytes that are not arrive as an exception from a
strict decode (files, standard input) or, in command-line arguments on Linux, as lone surrogates
(Python's surrogateescape); both are reported naming where the bytes were and how to convert them,
instead of reaching the tokenizer as a TypeError.

Outputs: a command that writes a model (quantize, finetune, train, merge) must never replace a user's
files by surprise. prepare_output_dir refuses an output that cannot be written or that already holds
files, unless the user passes --overwrite; clear_model_files then removes only the model, adapter and
training files neoj itself writes, so a new model is never mixed with an old one.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import NeojError

log = logging.getLogger(__name__)

CONVERT_HINT = "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"


# ---------------------------------------------------------------------------------------------
# Text


def not_utf8_error(where: str, byte: int, offset: int, shown: str | None = None) -> NeojError:
    """Returns the error for text at `where` (an argument, standard input, a file) that is not UTF-8."""
    context = f" of {shown}" if shown else ""
    return NeojError(f"{where} is not UTF-8 text (byte 0x{byte:02x} at offset {offset}{context}); {CONVERT_HINT}")


def decode_utf8(data: bytes, where: str) -> str:
    """Returns `data` decoded as strict UTF-8, or raises NeojError naming `where` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8_error(where, data[exc.start], exc.start) from None


def _escaped_byte(ch: str) -> int | None:
    """Returns the byte a surrogateescape'd character stands for, or None for any other character."""
    code = ord(ch)
    return code - 0xDC00 if 0xDC80 <= code <= 0xDCFF else None


def _show(ch: str) -> str:
    """Returns a character as an error message shows it: an undecodable byte as \\xNN, controls escaped."""
    byte = _escaped_byte(ch)
    if byte is not None:
        return f"\\x{byte:02x}"
    return ch if ch.isprintable() else repr(ch)[1:-1]


def check_utf8_text(text: str, where: str) -> str:
    """Returns `text`, or raises NeojError if it holds bytes that were not UTF-8 (lone surrogates).

    Command-line arguments and text read with errors="surrogateescape" carry undecodable bytes as
    the characters U+DC80..U+DCFF; the tokenizer rejects them with a TypeError.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as exc:
        offset = exc.start
    ch = text[offset]
    byte = _escaped_byte(ch)
    if byte is None:
        raise NeojError(f"{where} holds the lone surrogate U+{ord(ch):04X}, which is not text; {CONVERT_HINT}")
    start = max(0, offset - 20)
    shown = "".join(_show(c) for c in text[start : offset + 1])
    raise not_utf8_error(where, byte, len(text[:offset].encode("utf-8")), f"'{'...' if start else ''}{shown}'")


def read_stdin() -> str:
    """Returns all of standard input as strict UTF-8 text (newlines as "\\n"), or raises NeojError.

    The bytes are decoded here, not by the locale's text layer: a file piped in is read exactly as the
    same file named on the command line would be.
    """
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a replaced sys.stdin (io.StringIO in tests, an embedding application)
        return check_utf8_text(sys.stdin.read(), "standard input")
    text = decode_utf8(buffer.read(), "standard input")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_stdin_line() -> str:
    """Returns the next line of standard input as strict UTF-8 text ("" at the end), or raises NeojError."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return check_utf8_text(sys.stdin.readline(), "standard input")
    return decode_utf8(buffer.readline(), "standard input")


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[\\ntr])")
_SIMPLE_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def decode_escapes(text: str) -> str:
    """Returns `text` with backslash escapes replaced: \\n \\t \\r \\\\ \\xNN \\uNNNN \\UNNNNNNNN.

    So `--stop "\\n\\n"` in a shell, which passes a backslash and an n twice, means a blank line. Any
    other character (non-ASCII included) is kept as it is, and so is a backslash that starts no known
    escape, unlike codecs' unicode_escape, which reads the text as Latin-1. Raises ValueError for an
    escape that names no character (a surrogate, or beyond U+10FFFF).
    """
    def replace(match: re.Match) -> str:
        body = match.group(1)
        if body in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[body]
        code = int(body[1:], 16)
        if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
            raise ValueError(f"\\{body} names no character")
        return chr(code)

    return _ESCAPE.sub(replace, text)


# ---------------------------------------------------------------------------------------------
# Outputs

# What neoj writes into a model directory: weights (whole or sharded), config, tokenizer, quantization
# marker, LoRA adapter, and a training run's checkpoint, logs and leftover temporary files.
MODEL_FILE_PATTERNS = (
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "model.safetensors.tmp",
    "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
    "config.json", "generation_config.json", "quantization.json",
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
    "checkpoint.pt", ".checkpoint.pt.tmp.*", "train_log.jsonl", "train_results.json",
)


# The file prepare_output_dir writes to learn whether it can; other processes of a torchrun job may see it.
PROBE_PREFIX = ".neoj-write-probe-"


def _cannot(option: str, path: Path, exc: OSError, what: str) -> NeojError:
    reason = exc.strerror or str(exc)
    return NeojError(f"{option} {path} {what} ({reason}); choose a directory you can write to (nothing was written)")


def prepare_output_dir(out: str | os.PathLike, *, overwrite: bool = False, create: bool = False,
                       option: str = "--out") -> Path:
    """Returns `out` as a Path once it is sure a model may be written there.

    Raises NeojError, before anything is loaded, when `out` is a file, cannot be created or written, or
    already holds files and `overwrite` is False: a user's model is never replaced by surprise. A missing
    directory is created and removed again, so a command that then fails leaves nothing behind; with
    `create` it is kept (a training run, whose torchrun processes all check it at once, makes it anyway).
    """
    out = Path(out).expanduser()
    try:
        if out.exists() and not out.is_dir():
            raise NeojError(f"{option} {out} is a file, not a directory; choose a new directory (nothing was written)")
        if out.is_dir():
            if not overwrite and any(not p.name.startswith(PROBE_PREFIX) for p in out.iterdir()):
                raise NeojError(f"{option} {out} already exists and is not empty; choose a new directory, or pass "
                                "--overwrite to replace the model files in it (nothing was written)")
            _probe_writable(out, option)
            return out
    except NeojError:
        raise
    except OSError as exc:
        raise _cannot(option, out, exc, "cannot be used") from None
    missing = [out] + [p for p in out.parents if not p.exists()]  # the directories to create, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot(option, out, exc, "cannot be created") from None
    try:
        _probe_writable(out, option)
    finally:
        if not create:
            for directory in missing:
                try:
                    directory.rmdir()
                except OSError:  # no longer empty, or already gone: not ours to remove
                    break
    return out


def _probe_writable(directory: Path, option: str) -> None:
    """Raises NeojError unless a file can be created in `directory`; permissions alone do not tell (root,
    read-only mounts, /proc), so a file is written, and vanishes."""
    try:
        with tempfile.TemporaryFile(prefix=PROBE_PREFIX, dir=directory):
            pass
    except OSError as exc:
        raise _cannot(option, directory, exc, "is not writable") from None


def clear_model_files(out: str | os.PathLike) -> list[str]:
    """Deletes the files in `out` that neoj writes as a model (MODEL_FILE_PATTERNS); returns their names.

    Used with --overwrite, so that a new model is not mixed with an old one (quantized shards beside
    full-precision weights, an adapter beside a model). Other files and every subdirectory are kept.
    Every process of a torchrun job may call it at once: a file another one removed first is skipped.
    """
    out = Path(out)
    removed = []
    for path in sorted(out.iterdir()):
        if path.is_file() and any(fnmatch.fnmatchcase(path.name, pattern) for pattern in MODEL_FILE_PATTERNS):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("--overwrite: removed %s from %s", ", ".join(removed), out)
    return removed


def same_directory(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Returns True when a and b are the same existing directory (by inode, so links and ../ count)."""
    try:
        return Path(a).is_dir() and Path(b).is_dir() and os.path.samefile(a, b)
    except OSError:
        return False


def prepare_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """Returns `path` as a Path once it is sure a file can be appended to there; raises NeojError if not.

    An existing file is opened for appending and closed unchanged; a missing one is created and removed
    again, so nothing is left behind when the command then fails.
    """
    path = Path(path).expanduser()
    hint = "choose a file in a directory you can write to"
    if path.is_dir():
        raise NeojError(f"{option} {path} is a directory; give a file name")
    try:
        if path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            path.unlink()
    except FileExistsError:  # created meanwhile by another process: writing to it is for the command to try
        pass
    except OSError as exc:
        what = "cannot be written" if path.exists() else "cannot be created"
        raise NeojError(f"{option} {path} {what} ({exc.strerror or exc}); {hint}") from None
    return path
