"""Code completion that stops where the current function (or block) ends, detected on the stream.

Python (and other indentation languages): the enclosing `def`/`class` header (scope "function") or the
innermost block header (scope "block") is found in the code before the cursor; generation stops as soon
as a new line starts at that header's indentation or less. At top level, with no header to end, it
stops at the first blank line. Brace languages: braces are counted outside strings and comments; scope
"block" stops at the brace that closes the innermost open block, "function" when every brace is closed
(at top level: once a block has been opened and closed). The completion ends at the stop; blank lines
and indentation held back for the next line are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from .prompts import Prompts, resolve_prompts
from .runner import TaskError, as_runner, task_params

SCOPES = ("function", "block")
LANGUAGES = ("python", "braces")
BRACE_SUFFIXES = {".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".java", ".js", ".jsx", ".ts", ".tsx", ".go", ".rs",
                  ".cs", ".kt", ".swift", ".scala", ".php", ".dart", ".css", ".json"}
INDENT_SUFFIXES = {".py", ".pyi", ".pyx", ".nim", ".coffee"}
_FUNCTION_HEADER = re.compile(r"\s*(async\s+def|def|class)\b")
TAB = 8
DEFAULT_MAX_NEW_TOKENS = 256


def detect_language(code: str, filename: str | None = None) -> str:
    """Returns "python" or "braces": from the file's suffix, else from how the code opens its blocks."""
    if filename:
        suffix = Path(filename).suffix.lower()
        if suffix in INDENT_SUFFIXES:
            return "python"
        if suffix in BRACE_SUFFIXES:
            return "braces"
    lines = [ln.split("#")[0].rstrip() for ln in code.splitlines()]
    colons = sum(ln.endswith(":") for ln in lines)
    braces = sum(ln.endswith("{") for ln in lines)
    return "braces" if braces > colons else "python"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t")) + line[: len(line) - len(line.lstrip(" \t"))].count("\t") * (TAB - 1)


def _is_header(line: str) -> bool:
    return line.split("#")[0].rstrip().endswith(":")


def stop_indent(code: str, scope: str = "function") -> int | None:
    """Returns the indentation at or below which a new line ends the completion (None: top level, no header)."""
    lines = [ln for ln in code.split("\n") if ln.strip()]
    if not lines:
        return None
    chain = []  # enclosing block headers, innermost first
    level = _indent(lines[-1])
    if _is_header(lines[-1]):
        chain.append(lines[-1])
    for line in reversed(lines[:-1]):
        ind = _indent(line)
        if ind < level and _is_header(line):
            chain.append(line)
            level = ind
        if level == 0:
            break
    if not chain:
        return None
    if scope == "block":
        return _indent(chain[0])
    functions = [h for h in chain if _FUNCTION_HEADER.match(h)]
    return _indent(functions[0] if functions else chain[-1])


class IndentStop:
    """Emits generated code until a line starts at or below stop_indent (or a blank line, at top level)."""

    def __init__(self, code: str, scope: str = "function"):
        self.limit = stop_indent(code, scope)
        partial = code.rsplit("\n", 1)[-1]
        self.judged = bool(partial.strip())  # the first generated text continues a line already begun
        self.line_indent = "" if self.judged else partial  # whitespace of the current line so far
        self.held = ""
        self.emitted = False
        self.done = False

    def feed(self, piece: str) -> str:
        """Returns the part of `piece` that belongs to the completion; sets done at the stop."""
        out = []
        for c in piece:
            if self.done:
                break
            if self.judged:
                if c == "\n":
                    self.judged, self.line_indent, self.held = False, "", "\n"
                else:
                    out.append(c)
                continue
            if c == "\n":
                if self.limit is None and (self.emitted or out):  # a blank line ends top-level code
                    self.done = True
                    break
                self.held += c
                self.line_indent = ""
            elif c in " \t":
                self.held += c
                self.line_indent += c
            else:
                if self.limit is not None and _indent(self.line_indent) <= self.limit:
                    self.done = True
                    break
                out.append(self.held + c)
                self.held, self.judged = "", True
        self.emitted = self.emitted or bool(out)
        return "".join(out)


class BraceStop:
    """Emits generated code until the brace closing the current block (scope block) or all blocks (function)."""

    def __init__(self, code: str, scope: str = "function"):
        self.depth, self.state, self.prev, self.escape = 0, None, "", False
        for c in code:
            self._scan(c)
        self.start = self.depth
        self.target = self.depth - 1 if scope == "block" and self.depth > 0 else 0
        self.opened = self.depth > 0
        self.closing = False  # the block has closed; finishing its line's ");" tail
        self.done = False

    def _scan(self, c: str) -> None:
        """Tracks brace depth outside string literals and comments."""
        st = self.state
        if st in ('"', "'", "`"):
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == st or (c == "\n" and st != "`"):
                self.state = None
        elif st == "//":
            if c == "\n":
                self.state = None
        elif st == "/*":
            if self.prev == "*" and c == "/":
                self.state, c = None, ""
        elif self.prev == "/" and c in "/*":
            self.state = "/" + c
            c = "" if c == "*" else c  # so "/*/" does not end the comment it opens
        elif c in "\"'`":
            self.state = c
        elif c == "{":
            self.depth += 1
            self.opened = True
        elif c == "}":
            self.depth -= 1
        self.prev = c

    def feed(self, piece: str) -> str:
        """Returns the part of `piece` that belongs to the completion; sets done at the stop."""
        out = []
        for c in piece:
            if self.closing:
                if c in ");, \t":
                    out.append(c)
                    continue
                self.done = True
            if self.done:
                break
            self._scan(c)
            out.append(c)
            if self.state is None and c == "}" and self.opened and self.depth <= self.target:
                self.closing = True
        return "".join(out).rstrip(" \t") if self.done else "".join(out)


def stream_code(lm, code: str, *, scope: str = "function", language: str | None = None, filename: str | None = None,
                max_new_tokens: int | None = None, prompts: Prompts | dict | None = None, **options) -> Iterator[str]:
    """Yields the completion of `code` as it is generated, ending where the current function or block ends.

    scope: "function" or "block"; language: "python" (indentation) or "braces", else detected from
    `filename` or the code. max_new_tokens: default 256, at most half the context. Code longer than
    the context keeps its end. Options go to generation (greedy by default).
    """
    runner = as_runner(lm)
    p = resolve_prompts(prompts)
    if not isinstance(code, str) or not code.strip():
        raise TaskError("there is no code to complete: the input is empty")
    if scope not in SCOPES:
        raise TaskError(f"unknown scope {scope!r}; use {' or '.join(SCOPES)}")
    language = language or detect_language(code, filename)
    if language not in LANGUAGES:
        raise TaskError(f"unknown language {language!r}; use python (indentation blocks) or braces")
    watcher = (IndentStop if language == "python" else BraceStop)(code, scope)
    if max_new_tokens is None:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, runner.n_positions // 2)
    if not 1 <= max_new_tokens < runner.n_positions:
        raise TaskError(f"max_new_tokens={max_new_tokens} must be between 1 and the model's context "
                        f"({runner.n_positions}) minus room for the code")
    ids = runner.tokenizer.encode(p.render("code", code=code))
    ids = ids[max(0, len(ids) + max_new_tokens - runner.n_positions) :]  # a long file keeps its end, the cursor
    stream = runner.stream(ids, task_params(max_new_tokens, (), **options))
    try:
        for piece in stream:
            text = watcher.feed(piece)
            if text:
                yield text
            if watcher.done:
                return
    finally:
        stream.close()


def complete_code(lm, code: str, **options) -> str:
    """Returns the completion of `code` up to the end of the current function or block (see stream_code)."""
    return "".join(stream_code(lm, code, **options))
