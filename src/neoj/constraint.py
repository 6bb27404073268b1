"""Structured output: what a generated text must match (a JSON schema, any JSON object, a regular expression,
one of several strings, a Lark or GBNF grammar), and the requests of the APIs that ask for one.

A Constraint is only the specification: it turns itself into an llguidance grammar and checks it when it is
made, so a schema or regular expression llguidance refuses fails at once (ConstraintError, a GenerationError:
the server answers 400) instead of in the middle of a generation. Matching tokens against it is
neoj.constraint_matcher's work, which the engine's sequences and sampler use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import GenerationError

KINDS = ("json", "json_schema", "regex", "choice", "lark", "gbnf")

# JSON compiled the way OpenAI's structured outputs print it (", " and ": ", no other whitespace): a model with
# free whitespace can spend every token on spaces and newlines and never close the object.
JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(GenerationError):
    """A constraint llguidance cannot compile (a bad schema, regular expression or grammar), or a malformed
    request for one; the message is one line naming the problem."""


@dataclass(frozen=True)
class Constraint:
    """What the generated text must match. kind and value:

    - "json": any JSON object (value None);
    - "json_schema": a JSON value valid under the schema (value: the schema, a dict; an object that lists
      `properties` and says nothing of `additionalProperties` allows no other keys: see closed_objects);
    - "regex": the whole text matches the regular expression (value: str);
    - "choice": the text is exactly one of the strings (value: list[str]);
    - "lark": the text derives from the grammar's `start` rule (value: a grammar in llguidance's Lark syntax);
    - "gbnf": the same, from a llama.cpp GBNF grammar (its `root` rule), converted to Lark.
    """

    kind: str
    value: Any = None
    grammar: str = field(init=False, repr=False, compare=False)  # llguidance's form, checked

    def __post_init__(self) -> None:
        object.__setattr__(self, "grammar", _checked(_grammar(self.kind, self.value), self.kind))

    @classmethod
    def from_openai_response_format(cls, d: Any) -> "Constraint | None":
        """Returns the Constraint of an OpenAI `response_format` ({"type": "text" | "json_object" |
        "json_schema", ...}); None for plain text. Raises ConstraintError for any other shape."""
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            raise ConstraintError('response_format must be an object with a "type" ("text", "json_object" or '
                                  '"json_schema")')
        kind = d["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json")
        if kind == "json_schema":
            spec = d.get("json_schema")
            if not isinstance(spec, dict):
                raise ConstraintError('response_format "json_schema" needs a "json_schema" object holding the '
                                      '"schema"')
            schema = spec.get("schema", {"type": "object"})
            return cls("json_schema", schema)
        raise ConstraintError(f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'")

    @classmethod
    def from_tgi_grammar(cls, d: Any) -> "Constraint":
        """Returns the Constraint of a TGI `grammar` parameter: {"type": "json" | "json_object", "value":
        schema (a dict, or a JSON string of one)} or {"type": "regex", "value": str}."""
        if not isinstance(d, dict) or not isinstance(d.get("type"), str):
            raise ConstraintError('grammar must be an object with a "type" ("json", "json_object" or "regex") '
                                  'and a "value"')
        kind, value = d["type"], d.get("value")
        if kind in ("json", "json_object"):
            if value is None:
                return cls("json")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ConstraintError(f"grammar value is not a JSON schema: {exc}") from None
            return cls("json_schema", value)
        if kind == "regex":
            return cls("regex", value)
        raise ConstraintError(f"grammar type {kind!r} is not one of 'json', 'json_object', 'regex'")


def _grammar(kind: str, value: Any) -> str:
    """Returns llguidance's grammar for a constraint; raises ConstraintError for a value of the wrong type."""
    from llguidance import LLMatcher

    if kind not in KINDS:
        raise ConstraintError(f"constraint kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "json":
        value = {"type": "object"}
    if kind in ("json", "json_schema"):
        if not isinstance(value, dict):
            raise ConstraintError(f"a JSON schema must be an object, not {type(value).__name__}")
        try:
            return LLMatcher.grammar_from_json_schema(closed_objects(value), defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"invalid JSON schema: {_one_line(str(exc))}") from None
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise ConstraintError("choice needs a non-empty list of non-empty strings")
        return LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in value))
    if not isinstance(value, str) or not value:
        raise ConstraintError(f"a {kind} constraint needs a non-empty string")
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "gbnf":
        value = _gbnf_to_lark(value)
    return LLMatcher.grammar_from_lark(value)


# Where subschemas sit in a JSON schema: keys whose value is one schema, and keys holding a list or map of them.
_ONE_SCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_MANY_SCHEMAS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """Returns a copy of the schema in which every object schema that lists `properties` and says nothing of
    `additionalProperties` allows no others (the caller's schema is not changed).

    JSON Schema allows unlisted keys by default, and a model then free to add keys can spend every token on
    one more; XGrammar's strict mode (vLLM's default) and OpenAI's strict structured outputs close such objects
    too. A schema that wants other keys says so with "additionalProperties".
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE_SCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _MANY_SCHEMAS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _gbnf_to_lark(text: str) -> str:
    """Returns a llama.cpp GBNF grammar in llguidance's Lark syntax (its `root` rule as `start`)."""
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        lark = gbnf_to_lark(text)
    except Exception as exc:  # GbnfToLarkError and whatever its parser trips on
        raise ConstraintError(f"invalid GBNF grammar: {_one_line(str(exc))}") from None
    if not re.search(r"(?m)^\s*start\s*:", lark):
        lark += "\nstart: root\n"
    return lark


def _checked(grammar: str, kind: str) -> str:
    """Returns grammar once llguidance has compiled it; raises ConstraintError with its one-line reason."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        what = {"json": "JSON schema", "json_schema": "JSON schema", "regex": "regular expression",
                "choice": "choice", "lark": "Lark grammar", "gbnf": "GBNF grammar"}[kind]
        raise ConstraintError(f"invalid {what}: {_one_line(messages[0] if messages else 'rejected')}")
    return grammar


def _one_line(message: str) -> str:
    """Returns llguidance's (often multi-line, caret-annotated) message as one line: its first line and the line
    saying what the error is."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "rejected"
    why = next((line for line in lines[1:] if line.startswith("error:")), None)
    return f"{lines[0]} {why}" if why else lines[0]
