"""Sampling parameters at their extremes on every generating route, streamed or not: a value the route's
validation accepts generates (200 and text, never a 500 or an error event), one it refuses is a 422 naming it."""

import json

import httpx
import pytest

MODEL = "EleutherAI/gpt-neo-125m"
PROMPT = "Hello there"

# (path, stream): every route that generates, in each of its response forms.
ROUTES = [("/v1/completions", False), ("/v1/completions", True), ("/v1/chat/completions", False),
          ("/v1/chat/completions", True), ("/generate", False), ("/generate_stream", True), (f"/models/{MODEL}", False),
          (f"/models/{MODEL}", True), ("/", False), ("/", True), ("/v1/tasks/chat", False)]

ACCEPTED = [
    {"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 1e-300},
    {"repetition_penalty": 1e-300}, {"repetition_penalty": 5e-324}, {"top_p": 5e-324}, {"top_k": 10**30},
    {"temperature": 1e-300, "repetition_penalty": 1e-300, "top_p": 5e-324, "top_k": 10**30},
]
REFUSED = [({"temperature": 1e300}, "temperature"), ({"repetition_penalty": 1e300}, "repetition_penalty"),
           ({"top_p": 0}, "top_p"), ({"temperature": -1e-300}, "temperature")]


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(layers=2, model_id=MODEL)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def request_body(path: str, stream: bool, options: dict) -> dict:
    if path == "/v1/completions":
        return {"prompt": PROMPT, "max_tokens": 4, "seed": 1, "stream": stream, **options}
    if path == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "seed": 1, "stream": stream,
                **options}
    if path == "/v1/tasks/chat":
        return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "seed": 1, **options}
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "seed": 1, "return_full_text": False, **options},
            "stream": stream}


def stream_text(r: httpx.Response) -> str:
    """Returns the text of a stream of server-sent events; fails on an error event."""
    assert r.headers["content-type"].startswith("text/event-stream")
    text, done = "", False
    for line in r.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        assert "error" not in event, event
        if "choices" in event:
            for choice in event["choices"]:
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        elif event.get("token"):
            text += event["token"]["text"]
            done = done or event.get("generated_text") is not None
    assert done
    return text


def generate(http: httpx.Client, path: str, stream: bool, options: dict) -> str:
    """Returns the route's generated text for the options; fails unless the answer is a 200."""
    body = request_body(path, stream, options)
    if stream:
        with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200, r.read()
            return stream_text(r)
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    if path == "/v1/completions":
        return out["choices"][0]["text"]
    if path == "/v1/chat/completions":
        return out["choices"][0]["message"]["content"]
    if path == "/v1/tasks/chat":
        return out["reply"]
    return out["generated_text"] if path == "/generate" else out[0]["generated_text"]


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v:g}" for k, v in options.items())


@pytest.mark.parametrize("options", ACCEPTED, ids=option_id)
@pytest.mark.parametrize("path,stream", ROUTES, ids=lambda v: v if isinstance(v, str) else ("stream" if v else ""))
def test_every_accepted_value_generates(http, path, stream, options):
    text = generate(http, path, stream, options)
    assert isinstance(text, str)
    if set(options) == {"temperature"}:  # below 1e-5 is greedy decoding
        assert text == generate(http, path, stream, {"temperature": 0})


@pytest.mark.parametrize("options,field", REFUSED, ids=lambda v: v if isinstance(v, str) else option_id(v))
@pytest.mark.parametrize("path,stream", ROUTES, ids=lambda v: v if isinstance(v, str) else ("stream" if v else ""))
def test_refused_values_are_422_naming_the_field(http, path, stream, options, field):
    r = http.post(path, json=request_body(path, stream, options))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert field in (err["message"] if isinstance(err, dict) else err)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_json_numbers_are_422(http, literal):
    # Python's JSON reader accepts these non-standard literals: validation must refuse them, not the sampler.
    for path, body in [("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "temperature": %s}'),
                       ("/generate", b'{"inputs": "x", "parameters": {"repetition_penalty": %s}}')]:
        r = http.post(path, content=body % literal)
        assert r.status_code == 422, r.text
        assert "temperature" in r.text or "repetition_penalty" in r.text
