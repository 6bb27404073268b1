"""/openapi.json describes the routes the server really has: every route, each POST's JSON request body (the
model the route validates with), its error responses in the API family's shape, and its content types."""

import httpx
import pytest
from fastapi.routing import APIRoute

from neoj.server import kobold_schemas, schemas, tasks

KEY = "docs-key"
MODEL = "EleutherAI/gpt-neo-125m"
REF = "#/components/schemas/"

# The request model(s) of each POST route: what its handler parses the body with.
BODIES = {
    "/v1/completions": [schemas.CompletionRequest], "/v1/chat/completions": [schemas.ChatRequest],
    "/v1/embeddings": [schemas.EmbeddingRequest],
    "/models/{model_id}": [schemas.HFRequest, schemas.FeatureExtractionRequest],
    "/": [schemas.HFRequest, schemas.FeatureExtractionRequest],
    "/generate": [schemas.HFRequest], "/generate_stream": [schemas.HFRequest],
    "/models/{model_id}/pipeline/feature-extraction": [schemas.FeatureExtractionRequest],
    "/pipeline/feature-extraction/{model_id}": [schemas.FeatureExtractionRequest],
    "/embed": [schemas.FeatureExtractionRequest],
    "/v1/tasks/summarize": [tasks.SummarizeRequest], "/v1/tasks/ask": [tasks.AskRequest],
    "/v1/tasks/translate": [tasks.TranslateRequest], "/v1/tasks/classify": [tasks.ClassifyRequest],
    "/v1/tasks/complete-code": [tasks.CodeRequest], "/v1/tasks/chat": [tasks.ChatTaskRequest],
    "/tokenize": [schemas.TokenizeRequest], "/detokenize": [schemas.DetokenizeRequest],
    "/api/v1/generate": [kobold_schemas.KoboldGenerateRequest],
    "/api/latest/generate": [kobold_schemas.KoboldGenerateRequest],
    "/api/extra/generate/stream": [kobold_schemas.KoboldGenerateRequest],
    "/api/extra/abort": [kobold_schemas.KoboldGenkeyRequest],
    "/api/extra/generate/check": [kobold_schemas.KoboldGenkeyRequest],
    "/api/extra/tokencount": [kobold_schemas.KoboldTokenCountRequest],
}
# POSTs that never wait for the model thread: no 503
MODEL_FREE_POSTS = {"/tokenize", "/detokenize", "/api/extra/abort", "/api/extra/generate/check",
                    "/api/extra/tokencount"}
EVENTS_ONLY = {"/generate_stream", "/api/extra/generate/stream"}  # 200 is only ever server-sent events
# Where 200 may be server-sent events; /generate_stream answers nothing else.
STREAMING = {("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/models/{model_id}"),
             ("post", "/"), ("post", "/generate_stream")}


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(layers=2, model_id=MODEL, api_key=KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def spec(http):
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def api_routes(routes):
    """Yields every APIRoute, inside included routers too (FastAPI may keep those as one route each, holding
    the router included as original_router; the server includes its routers without a prefix)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


def operations(server):
    """Yields (method, path, route) for every route the app serves, as /openapi.json names them."""
    for route in api_routes(server.app.routes):
        for method in sorted(route.methods - {"HEAD"}):
            yield method.lower(), route.path_format, route


def resolve(spec: dict, schema: dict) -> dict:
    assert schema["$ref"].startswith(REF)
    return spec["components"]["schemas"][schema["$ref"][len(REF):]]


def test_every_route_is_documented(server, spec):
    documented = {(m, p) for p, item in spec["paths"].items() for m in item}
    served = {(m, p) for m, p, _ in operations(server)}
    assert served == documented
    assert {p for m, p in served if m == "post"} == set(BODIES)


def test_every_post_documents_its_request_model(server, spec):
    for method, path, _ in operations(server):
        if method != "post":
            continue
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True and list(body["content"]) == ["application/json"], path
        schema = body["content"]["application/json"]["schema"]
        refs = schema.get("anyOf", [schema])
        assert [r["$ref"] for r in refs] == [REF + m.__name__ for m in BODIES[path]], path
        for ref, model in zip(refs, BODIES[path]):
            documented = resolve(spec, ref)
            fields = {f.alias or name for name, f in model.model_fields.items()}
            assert set(documented["properties"]) == fields, (path, model.__name__)
            required = {f.alias or name for name, f in model.model_fields.items() if f.is_required()}
            assert set(documented.get("required", [])) == required, (path, model.__name__)


def test_error_responses_and_content_types(server, spec):
    for method, path, route in operations(server):
        responses = spec["paths"][path][method]["responses"]
        error_model = "OpenAIError" if path.startswith("/v1") else "KoboldError" if path.startswith("/api") \
            else "HFError"
        expected = set()
        if path != "/health":
            expected.add("401")  # the API key
        if method == "post":
            expected |= {"400", "413", "422"} | (set() if path in MODEL_FREE_POSTS else {"503"})
        names_a_model = "{model_id}" in path or any("model" in m.model_fields for m in BODIES.get(path, []))
        if names_a_model:
            expected.add("404")
        if path == "/health":
            expected.add("503")
        assert set(responses) - {"200"} == expected, (method, path)
        for code in expected:
            content = responses[code]["content"]
            assert list(content) == ["application/json"], (method, path, code)
            assert content["application/json"]["schema"]["$ref"] == REF + error_model
        types = set(responses["200"]["content"])
        if path in EVENTS_ONLY:
            assert types == {"text/event-stream"}, path
        elif (method, path) in STREAMING:
            assert types == {"application/json", "text/event-stream"}, path
        elif path == "/metrics":
            assert [t.split(";")[0] for t in types] == ["text/plain"]
        elif (method, path) == ("get", "/"):
            assert types == {"text/html"}
        else:
            assert types == {"application/json"}, (method, path)
    root = spec["paths"]["/"]["post"]
    assert "compat_generate" in root["summary"] and "feature extraction" in root["summary"]


def test_documented_error_bodies_are_what_the_server_answers(http):
    for path, body, model in [("/v1/completions", {"prompt": "x", "temperature": 5}, schemas.OpenAIError),
                              ("/generate", {"inputs": "x", "parameters": {"top_k": -1}}, schemas.HFError),
                              ("/embed", {"inputs": 5}, schemas.HFError)]:
        r = http.post(path, json=body)
        assert r.status_code == 422
        model.model_validate(r.json())
    schemas.HFError.model_validate(httpx.get(str(http.base_url) + "/metrics").json())  # 401, no key


def test_the_schema_is_valid_openapi(spec):
    import openapi_spec_validator  # a test dependency (pyproject [test])

    openapi_spec_validator.validate(spec)
