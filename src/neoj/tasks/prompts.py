"""Every prompt the tasks send to the model, in one place; any of them can be overridden.

GPT-Neo and GPT-J are base models: they follow no instructions, they continue documents. So each task
frames its input as a document whose natural continuation is the answer -- "TL;DR:" after a text (the
summarization trick of the GPT-2 paper), a "Q: ... A:" transcript, a few parallel translations, a
labelled list -- and cuts the continuation at a stop string. Templates are str.format strings; the
fields each one receives are listed in FIELDS, and an override using any other field is rejected.

    from neoj.tasks import Prompts, summarize
    summarize(lm, text, prompts=Prompts(summarize="{text}\\n\\nIn short:"))    # per call
    neoj summarize report.txt --prompts my_prompts.toml                       # on the command line

A prompts file (.json, or .toml on Python 3.11+) holds some of the names below as keys. Stops are lists
of strings; "translation_examples" maps a language to a list of sentences, the same sentences in the
same order in every language.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NeojError

# The same three sentences in each language: the few-shot examples of `translate`.
TRANSLATION_EXAMPLES: dict[str, tuple[str, ...]] = {
    "English": ("Where is the train station?", "I would like a cup of coffee, please.",
                "The weather is nice today."),
    "French": ("Où est la gare ?", "Je voudrais une tasse de café, s'il vous plaît.", "Il fait beau aujourd'hui."),
    "German": ("Wo ist der Bahnhof?", "Ich hätte gern eine Tasse Kaffee, bitte.", "Das Wetter ist heute schön."),
    "Spanish": ("¿Dónde está la estación de tren?", "Quisiera una taza de café, por favor.",
                "Hoy hace buen tiempo."),
    "Italian": ("Dov'è la stazione?", "Vorrei una tazza di caffè, per favore.", "Oggi il tempo è bello."),
    "Portuguese": ("Onde fica a estação de trem?", "Eu gostaria de uma xícara de café, por favor.",
                   "O tempo está bom hoje."),
    "Dutch": ("Waar is het treinstation?", "Ik wil graag een kopje koffie, alstublieft.",
              "Het weer is mooi vandaag."),
    "Chinese": ("火车站在哪里？", "请给我一杯咖啡。", "今天天气很好。"),
    "Japanese": ("駅はどこですか？", "コーヒーを一杯お願いします。", "今日はいい天気です。"),
}

# The fields each template receives (all of them optional to use, none other allowed).
FIELDS: dict[str, tuple[str, ...]] = {
    "summarize": ("text",),
    "summarize_combine": ("text",),
    "ask": ("question",),
    "ask_context": ("context", "question"),
    "ask_rank": ("context", "question"),
    "context_separator": (),
    "translate_header": ("source", "target"),
    "translate_example": ("source", "target", "source_text", "target_text"),
    "translate": ("source", "target", "text"),
    "classify_header": ("labels",),
    "classify_example": ("labels", "text", "label"),
    "classify": ("labels", "text"),
    "classify_label": ("label",),
    "code": ("code",),
    "chat_system": ("system",),
    "chat_user": ("message",),
    "chat_assistant": ("message",),
    "chat_reply": (),
    "chat_default_system": (),
}
# Templates that must use a field, or the task would silently drop its input.
REQUIRED: dict[str, tuple[str, ...]] = {
    "summarize": ("text",), "summarize_combine": ("text",), "ask": ("question",),
    "ask_context": ("context", "question"), "ask_rank": ("context", "question"), "translate": ("text",),
    "classify_example": ("text", "label"), "classify": ("text",), "classify_label": ("label",), "code": ("code",),
    "chat_user": ("message",), "chat_assistant": ("message",),
}
STOPS = ("summarize_stop", "ask_stop", "translate_stop", "chat_stop")


@dataclass(frozen=True)
class Prompts:
    """The templates and stop strings of every task (see the module docstring; defaults are the fields' values)."""

    # summarize: each chunk, then the joined chunk summaries, until one summary remains
    summarize: str = "{text}\n\nTL;DR:"
    summarize_combine: str = "{text}\n\nTL;DR:"
    summarize_stop: tuple[str, ...] = ("\n\n",)
    # ask: without a document, with the chosen passages of one, and how a passage is ranked by likelihood
    # (the log-probability of " {question}" after this text, the passage in {context})
    ask: str = "Q: {question}\nA:"
    ask_context: str = "{context}\n\nAnswer the question using the text above.\nQ: {question}\nA:"
    ask_rank: str = "{context}\n\nQ: {question}"
    context_separator: str = "\n\n"
    ask_stop: tuple[str, ...] = ("\n", "Q:")
    # translate: header, then one example per shot, then the text; one line at a time
    translate_header: str = "Translate {source} to {target}.\n\n"
    translate_example: str = "{source}: {source_text}\n{target}: {target_text}\n\n"
    translate: str = "{source}: {text}\n{target}:"
    translate_stop: tuple[str, ...] = ("\n",)
    translation_examples: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TRANSLATION_EXAMPLES))
    # classify: the label scored is classify_label after header + examples + classify
    classify_header: str = "Classify each text as one of: {labels}.\n\n"
    classify_example: str = "Text: {text}\nAnswer: {label}\n\n"
    classify: str = "Text: {text}\nAnswer:"
    classify_label: str = " {label}"
    # complete-code: the code as it is (a header such as a license line could go here)
    code: str = "{code}"
    # chat: the plain transcript `neoj serve` uses for /v1/chat/completions
    chat_system: str = "{system}\n\n"
    chat_user: str = "User: {message}\n"
    chat_assistant: str = "Assistant: {message}\n"
    chat_reply: str = "Assistant:"
    chat_stop: tuple[str, ...] = ("\nUser:",)
    chat_default_system: str = "The following is a conversation between a user and a helpful, knowledgeable assistant."

    def __post_init__(self):
        for name, allowed in FIELDS.items():
            _check_template(name, getattr(self, name), allowed, REQUIRED.get(name, ()))
        for name in STOPS:
            stops = getattr(self, name)
            if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
                raise NeojError(f"prompt {name} must be a list of non-empty strings, got {stops!r}")
            object.__setattr__(self, name, tuple(stops))
        _check_examples(self.translation_examples)

    def replace(self, **overrides) -> "Prompts":
        """Returns a copy with some templates replaced; an unknown name is an error listing the known ones."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(self))
            raise NeojError(f"unknown prompt name(s) {unknown}; known: {known}")
        if "translation_examples" in overrides:
            overrides["translation_examples"] = {**self.translation_examples, **overrides["translation_examples"]}
        return dataclasses.replace(self, **overrides)

    def render(self, name: str, **values) -> str:
        """Returns template `name` filled with `values`."""
        return getattr(self, name).format(**values)

    @classmethod
    def load(cls, path: str | Path) -> "Prompts":
        """Returns the defaults overridden by a .json or .toml file of {name: template}."""
        return cls().replace(**read_prompts_file(path))


def read_prompts_file(path: str | Path) -> dict:
    """Returns the overrides in a prompts file (.json, or .toml on Python 3.11+)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NeojError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise NeojError(f"{path}: TOML prompts files need Python 3.11; write it as JSON") from None
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NeojError(f"prompts file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") \
            from None
    if not isinstance(data, dict):
        raise NeojError(f"prompts file {path} must hold an object of prompt names, not {type(data).__name__}")
    return data


def resolve_prompts(prompts: "Prompts | dict | str | Path | None") -> Prompts:
    """Returns Prompts from Prompts, a dict of overrides, a prompts file path, or None (the defaults)."""
    if prompts is None:
        return DEFAULT_PROMPTS
    if isinstance(prompts, Prompts):
        return prompts
    if isinstance(prompts, dict):
        return DEFAULT_PROMPTS.replace(**prompts)
    return Prompts.load(prompts)


def _check_template(name: str, template, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    if not isinstance(template, str):
        raise NeojError(f"prompt {name} must be a string, got {type(template).__name__}")
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise NeojError(f"prompt {name} is not a valid template ({exc}); write a literal brace as {{{{ or }}}}") \
            from None
    bad = sorted(f for f in used if f not in allowed)
    if bad:
        fields = ", ".join("{" + f + "}" for f in allowed) or "none"
        raise NeojError(f"prompt {name} uses unknown field(s) {bad}; its fields are: {fields}")
    missing = [f for f in required if f not in used]
    if missing:
        raise NeojError(f"prompt {name} must contain {', '.join('{' + f + '}' for f in missing)}")


def _check_examples(examples) -> None:
    if not isinstance(examples, dict):
        raise NeojError("translation_examples must map a language to a list of sentences")
    lengths = set()
    for lang, sentences in examples.items():
        if isinstance(sentences, str) or not all(isinstance(s, str) and s.strip() for s in sentences):
            raise NeojError(f"translation_examples[{lang!r}] must be a list of non-empty sentences")
        lengths.add(len(sentences))
    if len(lengths) > 1:
        raise NeojError("translation_examples must give the same number of sentences in every language "
                        f"(got {sorted(lengths)}): sentence i of each language is one example")


DEFAULT_PROMPTS = Prompts()
