"""Every bad request gets a clear 4xx JSON error in its API's shape, never a 500; the API key guards all but /health."""

import json
import re
import threading
import time

import httpx
import openai
import pytest

KEY = "s3cret-key"
LIMIT = 4096


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(layers=2, model_id="EleutherAI/gpt-neo-125m", api_key=KEY, max_body_bytes=LIMIT)


@pytest.fixture(scope="module")
def lm(server):
    return server.lm


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def openai_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err["message"]


def hf_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["error"], str) and body["error_type"]
    return body["error"]


GUARDED = [("GET", "/"), ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", "/v1/completions"),
           ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"), ("POST", "/models/EleutherAI/gpt-neo-125m"),
           ("POST", "/"), ("POST", "/generate"), ("POST", "/generate_stream"), ("GET", "/info"), ("GET", "/metrics"),
           ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no-such-route"), ("POST", "/embed"),
           ("POST", "/pipeline/feature-extraction/x"), ("POST", "/models/x/pipeline/feature-extraction"),
           ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/api/v1/model"), ("POST", "/api/v1/generate"),
           ("POST", "/api/extra/generate/stream"), ("POST", "/api/extra/abort"), ("GET", "/api/extra/version"),
           ("POST", "/api/extra/tokencount")]


def error_message(path: str, body: dict) -> str:
    """Returns the message of an error body in the shape of the path's API family."""
    if path.startswith("/v1"):
        return body["error"]["message"]
    return body["detail"]["msg"] if path.startswith("/api") else body["error"]


@pytest.mark.parametrize("method,path", GUARDED)
def test_every_endpoint_but_health_needs_the_key(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic !!"}):
        r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x", "inputs": "x"})
        assert r.status_code == 401, (path, headers, r.text)
        assert "API key" in error_message(path, r.json())
        assert r.headers["WWW-Authenticate"]


def test_health_is_open_and_keys_compare_in_constant_time(server, monkeypatch):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    import hmac

    import neoj.server.app as app_module

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert httpx.get(server.url + "/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert calls
    # Browsers (the playground page) may send the key as a Basic-auth password.
    assert httpx.get(server.url + "/", auth=("anyone", KEY)).status_code == 200
    assert 'Basic realm="neoj"' in httpx.get(server.url + "/").headers["WWW-Authenticate"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_prompt_too_long_names_its_tokens_and_the_limit(lm, http):
    prompt = "word " * 150
    n = len(lm.tokenizer.encode(prompt))
    msg = openai_error(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10}), 400)
    assert f"{n} tokens" in msg and "128 tokens" in msg and "truncate" in msg
    ok = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "truncate": True})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 118
    msg = hf_error(http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 5}}), 400)
    assert f"{n} tokens" in msg and "128" in msg
    ok = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 5, "truncate": 50}})
    assert ok.status_code == 200
    chat = [{"role": "user", "content": prompt}]
    assert "128 tokens" in openai_error(http.post("/v1/chat/completions", json={"messages": chat}), 400)
    assert "128 tokens" in openai_error(http.post("/v1/embeddings", json={"input": "word " * 200}), 400)
    msg = openai_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 500}), 400)
    assert "max_tokens=500" in msg and "128" in msg


OUT_OF_RANGE = [
    ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"50256": -101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"not-an-id": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "x", "priority": "high"}, "priority"),
    ("/v1/completions", {"prompt": [[1, 99999999]]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}, "top_logprobs"),
    ("/v1/embeddings", {"input": "x", "dimensions": 7}, "dimensions"),
    ("/embed", {"inputs": "x", "truncation_direction": "up"}, "truncation_direction"),
    ("/", {"inputs": "x", "dimensions": 7}, "dimensions"),
    ("/generate", {"inputs": "x", "parameters": {"top_k": -1}}, "top_k"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": -5}}, "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"repetition_penalty": 0}}, "repetition_penalty"),
    ("/generate", {"inputs": "x", "parameters": {"typical_p": 0}}, "typical_p"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2}}, "best_of"),  # needs sampling
    ("/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}, "best_of"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "x"}}}, "grammar"),
    ("/models/EleutherAI/gpt-neo-125m", {"inputs": "x", "parameters": {"max_time": -1}}, "max_time"),
    ("/models/EleutherAI/gpt-neo-125m", {"inputs": "x", "parameters": {"num_return_sequences": 1000}},
     "num_return_sequences"),
]


@pytest.mark.parametrize("path,body,field", OUT_OF_RANGE)
def test_out_of_range_parameters_are_422(http, path, body, field):
    r = http.post(path, json=body)
    msg = openai_error(r, 422) if path.startswith("/v1") else hf_error(r, 422)
    assert field in msg


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/generate",
                                  "/models/EleutherAI/gpt-neo-125m", "/", "/embed"])
def test_malformed_wrong_types_and_empty(http, path):
    check = openai_error if path.startswith("/v1") else hf_error
    assert "malformed JSON" in check(http.post(path, content=b'{"prompt": "x",'), 400)
    assert "empty" in check(http.post(path, content=b""), 400)
    assert "UTF-8" in check(http.post(path, content=b'{"prompt": "\xff\xfe"}'), 400)
    assert "surrogate" in check(http.post(path, content=b'{"prompt": "a\\ud800", "inputs": "a\\ud800", '
                                                        b'"messages": [{"role": "user", "content": "\\udfff"}], '
                                                        b'"input": "\\ud800"}'), 400)
    assert "nested" in check(http.post(path, content=b"[" * 2000 + b"]" * 2000), 400)
    assert "JSON object" in check(http.post(path, json=[1, 2]), 422)
    wrong = {"/v1/completions": {"prompt": "x", "max_tokens": "10"},
             "/v1/chat/completions": {"messages": "hello"},
             "/v1/embeddings": {"input": {"text": "x"}}, "/embed": {"inputs": 5}}.get(
        path, {"inputs": "x", "parameters": {"do_sample": "yes"}})
    check(http.post(path, json=wrong), 422)
    empty = {"/v1/completions": {"prompt": ""}, "/v1/chat/completions": {"messages": []},
             "/v1/embeddings": {"input": ""}}.get(path, {"inputs": ""})
    check(http.post(path, json=empty), 422)
    missing = check(http.post(path, json={}), 422)
    assert "Field required" in missing


def test_body_size_limit_is_413(http):
    big = json.dumps({"prompt": "x" * (LIMIT + 10)})
    assert "limit" in openai_error(http.post("/v1/completions", content=big), 413)
    assert "limit" in hf_error(http.post("/generate", content=big), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 1000

    assert "limit" in openai_error(http.post("/v1/completions", content=chunks()), 413)


def test_unknown_model_ids_are_404(http):
    msg = openai_error(http.post("/v1/completions", json={"model": "EleutherAI/gpt-j-6b", "prompt": "x"}), 404)
    assert "EleutherAI/gpt-neo-125m" in msg
    openai_error(http.get("/v1/models/etc/passwd"), 404)
    openai_error(http.post("/v1/embeddings", json={"model": "/tmp/model", "input": "x"}), 404)
    hf_error(http.post("/models/some/where", json={"inputs": "x"}), 404)
    assert http.post("/v1/completions", json={"model": "GPT-NEO-125M", "prompt": "x", "max_tokens": 1}).status_code \
        == 200


def test_unsupported_options_are_explained(http):
    assert "suffix" in openai_error(http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 422)
    msg = openai_error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), 422)
    assert "tools" in msg
    assert http.get("/v1/completions").status_code == 405


def test_metrics_are_prometheus_text(http):
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? -?[0-9.e+\-]+(Inf)?$')
    for line in r.text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    text = r.text
    for name in ("neoj_queue_depth", "neoj_running_sequences", "neoj_generated_tokens_total",
                 "neoj_prompt_tokens_total", "neoj_request_duration_seconds_bucket", "neoj_time_to_first_token_seconds",
                 'neoj_http_requests_total{route="/v1/completions",status="200"}'):
        assert name in text


def test_queue_full_is_503_with_retry_after(serve_tiny):
    srv = serve_tiny(n_positions=2048, layers=2, max_batch=1, max_queue=1)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        engine = srv.app.state.neoj.engine
        busy = {"prompt": "a", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=busy) as running:
            lines = running.iter_lines()  # kept referenced: a collected iterator closes the connection
            next(lines)  # its first token: it holds the only slot
            waiting = threading.Thread(target=lambda: c.post("/generate", json={"inputs": "b"}))
            waiting.start()
            deadline = time.monotonic() + 10
            while engine.stats.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            full = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 1})
            assert "busy" in openai_error(full, 503)
            assert int(full.headers["Retry-After"]) >= 1
            tgi = c.post("/generate", json={"inputs": "c"})
            assert hf_error(tgi, 503) and tgi.json()["error_type"] == "overloaded" and tgi.headers["Retry-After"]
        waiting.join(30)
        assert not waiting.is_alive()
        assert "neoj_queue_rejected_total 2" in c.get("/metrics").text


def test_binds_loopback_by_default(server):
    import inspect

    from neoj.server import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert server.server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"
