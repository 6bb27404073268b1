"""Reading a request's body: JSON whatever the Content-Type, valid Unicode, validated against the route's
pydantic model, with every error answered as a 400 or a 422 that names the bad field and why."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .common import APIError

M = TypeVar("M", bound=BaseModel)


async def read_json(request: Request) -> object:
    """Returns the parsed JSON body whatever the Content-Type (curl -d sends form-encoded), or a 400."""
    body = await request.body()
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON in the request body: nested too deeply") from None
    _check_unicode(data)
    return data


def _check_unicode(data: object) -> None:
    """Rejects strings holding a lone UTF-16 surrogate ("\\ud800" in JSON), which no tokenizer can encode."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the request holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which "
                               "is not text; send valid Unicode") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def parse(model: type[M], data: object) -> M:
    """Returns the validated request, or a 422 naming each bad field and why."""
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise APIError(422, validation_message(exc), param=_first_loc(exc)) from None


# Fields that accept several shapes: one line saying which, instead of one per alternative tried.
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "input": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "inputs": "a string or a list of strings", "stop": "a string or a list of strings",
    "stop_sequences": "a string or a list of strings", "content": "a string or a list of text parts",
    "truncate": "a token count or true/false",
}


def validation_message(exc: ValidationError) -> str:
    """Returns pydantic's errors as one line per field: "temperature: Input should be ... (got 5)"."""
    seen, lines = set(), []
    errors = exc.errors(include_url=False)
    for err in errors:
        parts = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        union = next((i for i, p in enumerate(parts) if p in UNION_FIELDS), None)
        if union is not None and err["type"] != "missing":
            key = ".".join(parts[: union + 1])
            if key not in seen:
                seen.add(key)
                same = [e for e in errors if ".".join(str(p) for p in e["loc"] if not _is_union_tag(p)).startswith(key)]
                specific = [e for e in same if not e["type"].endswith(("_type", "_parsing"))]
                lines.append(f"{key}: {specific[0]['msg']}" if specific else
                             f"{key}: must be {UNION_FIELDS[parts[union]]}")
            continue
        loc = ".".join(parts)
        msg = err["msg"]
        key = (loc, msg)
        if key in seen:
            continue
        seen.add(key)
        got = err.get("input")
        got = json.dumps(got)[:60] if _jsonable(got) else repr(got)[:60]
        shown = "" if err["type"] == "missing" else f" (got {got})"
        lines.append(f"{loc or 'body'}: {msg}{shown}")
    if len(lines) > 4:  # a union tries every alternative; the first few are enough
        lines = lines[:4] + [f"... and {len(lines) - 4} more"]
    return "; ".join(lines)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict",
                                                               "constrained-int", "constrained-float"))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _first_loc(exc: ValidationError) -> str | None:
    errs = exc.errors()
    return str(errs[0]["loc"][0]) if errs and errs[0]["loc"] else None
