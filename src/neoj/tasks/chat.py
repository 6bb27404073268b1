"""Chat with a base model: a persona, a transcript, and a history trimmed to the context oldest turn first.

The transcript format is the one `neoj serve` uses for /v1/chat/completions (see Prompts.chat_*). Each
prompt holds the persona, then as many of the most recent messages as fit in the context minus the
reply's budget; older ones are left out of the prompt (not forgotten: /save still writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import ContextLengthError, NeojError
from ..tokenizer import Tokenizer
from .prompts import Prompts, resolve_prompts
from .runner import TaskError, as_runner, task_params

ROLES = ("user", "assistant")
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ChatReply:
    """A reply, the tokens of the prompt it answered, and how many old messages the prompt left out."""

    text: str
    prompt_tokens: int
    dropped: int


def fit_history(tokenizer: Tokenizer, p: Prompts, system: str, messages: list[tuple[str, str]],
                budget: int) -> tuple[list[int], int]:
    """Returns (prompt ids, messages left out): the persona and the newest messages whose prompt fits `budget`.

    Raises ContextLengthError when even the persona and the last message alone do not fit.
    """
    for role, _ in messages:
        if role not in ROLES:
            raise TaskError(f"unknown chat role {role!r}; use {' or '.join(ROLES)}")
    head = p.render("chat_system", system=system) if system else ""
    parts = [p.render("chat_user" if role == "user" else "chat_assistant", message=text) for role, text in messages]
    fixed = len(tokenizer.encode(head + p.chat_reply))
    # Estimate from per-message counts, then check the real encoding (BPE can merge across a junction).
    start, total = len(parts), fixed
    while start > 0 and total + len(tokenizer.encode(parts[start - 1])) <= budget:
        start -= 1
        total += len(tokenizer.encode(parts[start]))
    start = min(start, max(0, len(parts) - 1))  # the newest message always goes in (checked below)
    while True:
        ids = tokenizer.encode(head + "".join(parts[start:]) + p.chat_reply)
        if len(ids) <= budget:
            return ids, start
        if start >= len(parts) - 1:
            raise ContextLengthError(
                f"the persona and the last message need {len(ids)} tokens, but the context leaves {budget} "
                "for the prompt after the reply's budget; shorten the message or the persona, or lower "
                "max_new_tokens", len(ids), budget)
        start += 1


class ChatSession:
    """A conversation: persona, messages so far, and replies streamed from the model."""

    def __init__(self, lm, system: str | None = None, *, max_new_tokens: int | None = None,
                 prompts: Prompts | dict | None = None, **options):
        """max_new_tokens: a reply's budget (default 256, at most half the context); options go to
        generation (temperature 0.7 unless given)."""
        self.runner = as_runner(lm)
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, self.runner.n_positions // 2)
        self.prompts = resolve_prompts(prompts)
        self.system = self.prompts.chat_default_system if system is None else system
        self.options = options
        self.max_new_tokens = max_new_tokens
        if not 1 <= max_new_tokens < self.runner.n_positions:
            raise TaskError(f"max_new_tokens={max_new_tokens} must be between 1 and the context "
                            f"({self.runner.n_positions}) minus room for a prompt")
        self.messages: list[tuple[str, str]] = []
        self.last: ChatReply | None = None

    @property
    def budget(self) -> int:
        """Returns the tokens a prompt may have: the context minus the reply's budget."""
        return self.runner.n_positions - self.max_new_tokens

    def prompt_ids(self, messages: list[tuple[str, str]] | None = None) -> tuple[list[int], int]:
        """Returns (prompt ids, messages left out) for the history (plus `messages`), trimmed to the budget."""
        return fit_history(self.runner.tokenizer, self.prompts, self.system, self.messages + list(messages or []),
                           self.budget)

    def stream(self, message: str) -> Iterator[str]:
        """Yields the reply to `message` as it is generated; both join the history once the reply is done."""
        message = message.strip() if isinstance(message, str) else ""
        if not message:
            raise TaskError("the message is empty")
        ids, dropped = self.prompt_ids([("user", message)])
        params = task_params(self.max_new_tokens, self.prompts.chat_stop, **{"temperature": 0.7, **self.options})
        pieces, started = [], False
        for piece in self.runner.stream(ids, params):
            if not started:  # the transcript puts a space after "Assistant:"; the reply starts after it
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                pieces.append(piece)
                yield piece
        reply = "".join(pieces).rstrip()
        self.messages += [("user", message), ("assistant", reply)]
        self.last = ChatReply(reply, len(ids), dropped)

    def send(self, message: str) -> str:
        """Returns the reply to `message` (and records both)."""
        return "".join(self.stream(message)).rstrip()

    def reset(self) -> None:
        """Forgets every message (the persona stays)."""
        self.messages = []
        self.last = None

    def to_dict(self) -> dict:
        """Returns the conversation as {"system", "messages": [{"role", "content"}]}."""
        return {"system": self.system, "messages": [{"role": r, "content": t} for r, t in self.messages]}

    def save(self, path: str | Path) -> Path:
        """Writes the conversation as JSON to `path`; returns it."""
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise NeojError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    def load(self, path: str | Path) -> None:
        """Replaces the persona and messages with those saved in `path`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            messages = [(m["role"], m["content"]) for m in data["messages"]]
            system = data.get("system", self.system)
        except OSError as exc:
            raise NeojError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise NeojError(f"{path} is not a saved chat ({{\"system\", \"messages\": [{{\"role\", \"content\"}}]}}): "
                            f"{exc}") from None
        if any(r not in ROLES or not isinstance(t, str) for r, t in messages) or not isinstance(system, str):
            raise NeojError(f"{path}: messages need a role (user or assistant) and text content")
        self.system, self.messages = system, messages


def chat_reply(lm, messages: list[tuple[str, str]], system: str | None = None, *, max_new_tokens: int | None = None,
               prompts: Prompts | dict | None = None, **options) -> ChatReply:
    """Returns the assistant's reply to the messages ((role, text), the last from the user), history trimmed."""
    if not messages or messages[-1][0] != "user":
        raise TaskError("the last message must be the user's")
    session = ChatSession(lm, system, max_new_tokens=max_new_tokens, prompts=prompts, **options)
    session.messages = [(r, t) for r, t in messages[:-1]]
    text = session.send(messages[-1][1])
    return session.last if session.last is not None else ChatReply(text, 0, 0)
