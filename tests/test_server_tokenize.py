"""POST /tokenize (vLLM's and TGI's shapes) and /detokenize (vLLM's) on a real server, via httpx."""

import httpx
import pytest

MODEL = "EleutherAI/gpt-neo-125m"


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(model_id=MODEL)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


TEXT = "Hello, wörld! def f(x):\n    return x  # 🙂"


def test_vllm_tokenize_and_detokenize_round_trip(server, http):
    tok = server.lm.tokenizer
    r = http.post("/tokenize", json={"model": MODEL, "prompt": TEXT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(TEXT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 128 and body["token_strs"] == [tok.token_text(t) for t in body["tokens"]]
    assert http.post("/tokenize", json={"prompt": TEXT}).json()["token_strs"] is None
    back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.json() == {"prompt": TEXT}


def test_vllm_tokenize_renders_chat_messages_with_the_template(server, http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    rendered = server.lm.tokenizer.decode(body["tokens"])
    assert "Be brief." in rendered and "Hi" in rendered and body["count"] == len(body["tokens"])


def test_tgi_tokenize_gives_character_spans(server, http):
    r = http.post("/tokenize", json={"inputs": TEXT, "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    spans = r.json()
    assert [s["id"] for s in spans] == server.lm.tokenizer.encode(TEXT)
    assert all(s["text"] == TEXT[s["start"] : s["stop"]] for s in spans)
    assert spans[0]["start"] == 0 and spans[-1]["stop"] == len(TEXT)


@pytest.mark.parametrize("path,body,field", [
    ("/tokenize", {"prompt": "x", "inputs": "y"}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {"tokens": [1, 99999999]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_bad_bodies_are_422_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert r.status_code == 422 and field in r.json()["error"], r.text


def test_an_unknown_model_is_404(http):
    assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
