"""What /openapi.json says about each route: its JSON request body, its error responses and its content types.

The routes read their bodies themselves (common.read_json and parse: any Content-Type, as curl -d sends
form-encoded, and errors in each API family's shape), so FastAPI cannot see their request models. Each route
declares them instead with describe(): the body's pydantic models, the error statuses it can answer, and
whether it streams server-sent events. install() then moves the models' JSON schemas into
components/schemas, where the requestBody and error references point.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..errors import NeojError
from .schemas import HFError, KoboldError, OpenAIError

REF = "#/components/schemas/{model}"
SSE = "text/event-stream"
_COMPONENTS = "x-neoj-components"  # carries a route's schemas from describe() to install(); removed there

ERRORS = {
    400: "Malformed JSON, or a prompt that cannot fit the model's context (naming its tokens and the limit)",
    401: "Missing or wrong API key (when the server has one)",
    404: "The model named is not the one served",
    413: "The request body is over the server's limit",
    422: "Wrong types, out-of-range or unsupported parameters, empty input (naming the field)",
    503: "The server is busy: retry after the Retry-After header's seconds",
}
GENERATION_ERRORS = (400, 401, 413, 422, 503)  # every POST that runs the model; 404 where it names a model


def _schema(model: type[BaseModel]) -> tuple[dict, dict]:
    """Returns ({"$ref"} to the model, the component schemas it needs: itself and its nested models)."""
    schema = model.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    defs[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}, defs


def error_model(path: str) -> type[BaseModel]:
    """Returns the error body of the API family a path belongs to: OpenAI's under /v1, KoboldAI's under /api,
    else Hugging Face's (app.error_body builds them)."""
    if path.startswith("/v1"):
        return OpenAIError
    return KoboldError if path.startswith("/api") else HFError


def describe(path: str, *, body: type[BaseModel] | tuple[type[BaseModel], ...] | None = None,
             errors: tuple[int, ...] = (401,), stream: bool = False, summary: str | None = None) -> dict:
    """Returns the route decorator's keyword arguments that document it in /openapi.json.

    body: the request model (a tuple: the body is any one of them); errors: the statuses the route may answer
    besides 200, each with the API family's error body (OpenAI's under /v1, else Hugging Face's); stream:
    whether 200 may also be text/event-stream (routes whose response_class is the event stream need not say).
    """
    components: dict = {}
    extra: dict = {}
    if body is not None:
        refs = []
        for model in body if isinstance(body, tuple) else (body,):
            ref, defs = _schema(model)
            refs.append(ref)
            components.update(defs)
        extra["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}}}
    error_ref, defs = _schema(error_model(path))
    components.update(defs)
    responses: dict = {code: {"description": ERRORS[code], "content": {"application/json": {"schema": error_ref}}}
                       for code in errors}
    if stream:
        extra["responses"] = {"200": {"content": {SSE: {"schema": {
            "type": "string", "description": 'server-sent events ("data: {json}" lines) when "stream" is true'}}}}}
    extra[_COMPONENTS] = components
    out = {"responses": responses, "openapi_extra": extra}
    if summary:
        out["summary"] = summary
    return out


def install(app: FastAPI) -> None:
    """Makes app.openapi() gather the schemas describe() declared into components/schemas."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for item in schema["paths"].values():
            for operation in item.values():
                # FastAPI adds its own 422 to routes with path parameters; ours answer 422 themselves, if at all.
                if "HTTPValidationError" in str(operation["responses"].get("422", {})):
                    del operation["responses"]["422"]
                for name, definition in operation.pop(_COMPONENTS, {}).items():
                    if components.setdefault(name, definition) != definition:
                        raise NeojError(f"two different request models are both named {name}")
        if "HTTPValidationError" not in str(schema["paths"]):
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
