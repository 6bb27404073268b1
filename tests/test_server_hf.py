"""The HF Inference API (curl's shape, via httpx) and TGI (huggingface_hub's InferenceClient) on a real server."""

import json

import httpx
import pytest
from huggingface_hub import InferenceClient

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(model_id="EleutherAI/gpt-j-6B", api_key=KEY)


@pytest.fixture(scope="module")
def lm(server):
    return server.lm


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def hub(server):
    return InferenceClient(base_url=server.url, api_key=KEY)


def test_the_seeds_curl_works_with_only_the_host_changed(server):
    # curl -X POST .../models/EleutherAI/gpt-j-6B -H "Authorization: Bearer ..." -d '{"inputs": "..."}'
    # curl -d sends Content-Type: application/x-www-form-urlencoded.
    body = b'{"inputs": "Write a poem about autumn."}'
    r = httpx.post(f"{server.url}/models/EleutherAI/gpt-j-6B", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and len(out) == 1
    assert out[0]["generated_text"].startswith("Write a poem about autumn.")  # return_full_text defaults on
    assert len(out[0]["generated_text"]) > len("Write a poem about autumn.")


def test_inference_api_parameters(lm, http):
    params = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    r = http.post("/models/gpt-j-6B", json={"inputs": "Hello", "parameters": params,
                                            "options": {"use_cache": False, "wait_for_model": True}})
    assert r.json() == [{"generated_text": lm.generate("Hello", max_new_tokens=6, temperature=0)}]
    both = http.post("/models/EleutherAI/gpt-j-6B", json={"inputs": ["Hello", "Bye"], "parameters": params}).json()
    assert [len(x) for x in both] == [1, 1] and both[0] == r.json()
    several = http.post("/models/EleutherAI/gpt-j-6B", json={
        "inputs": "Hello", "parameters": {"max_new_tokens": 4, "num_return_sequences": 3, "seed": 1}}).json()
    assert len(several) == 3 and all(s["generated_text"].startswith("Hello") for s in several)
    # The Neuro API's names: max_length counts the prompt, remove_input drops it, penalty is repetition_penalty.
    neuro = http.post("/models/EleutherAI/gpt-j-6B", json={
        "inputs": "Hello", "parameters": {"max_length": 7, "remove_input": True, "penalty": 1.0,
                                          "do_sample": False}}).json()
    assert neuro == r.json()
    timed = http.post("/models/EleutherAI/gpt-j-6B", json={
        "inputs": "Hello", "parameters": {"max_new_tokens": 100, "max_time": 0.001, "return_full_text": False}})
    assert timed.status_code == 200 and len(lm.tokenizer.encode(timed.json()[0]["generated_text"])) < 100


def test_root_and_unknown_model(http):
    r = http.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    missing = http.post("/models/EleutherAI/gpt-neo-2.7B", json={"inputs": "x"})
    assert missing.status_code == 404 and "not served" in missing.json()["error"]
    assert missing.json()["error_type"] == "not_found"


def test_root_is_tgis_compat_generate(lm, http):
    # POST / is TGI's compat_generate, as an Inference Endpoint serves it: /generate's text (greedy, the prompt
    # not returned) in a one-item list, or /generate_stream's events when "stream" is true.
    greedy = lm.generate("The sky is", max_new_tokens=6, temperature=0)
    body = {"inputs": "The sky is", "parameters": {"max_new_tokens": 6}}
    assert http.post("/", json=body).json() == [{"generated_text": greedy}]
    assert http.post("/generate", json=body).json() == {"generated_text": greedy}

    def events(path, payload):
        with http.stream("POST", path, json=payload) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]

    streamed = events("/", {**body, "stream": True})
    assert streamed == events("/generate_stream", body)
    assert "".join(e["token"]["text"] for e in streamed) == greedy and streamed[-1]["generated_text"] == greedy
    # The Inference API's defaults are at POST /models/{id}: sampling, and the prompt returned.
    assert http.post("/models/gpt-j-6B", json=body).json()[0]["generated_text"].startswith("The sky is")


def test_inference_client_text_generation(lm, hub):
    ref = lm.generate("The sky is", max_new_tokens=10, temperature=0, stop_at_eos=True)
    assert hub.text_generation("The sky is", max_new_tokens=10) == ref
    pieces = list(hub.text_generation("The sky is", max_new_tokens=10, stream=True))
    assert "".join(pieces) == ref
    detailed = hub.text_generation("The sky is", max_new_tokens=10, details=True, decoder_input_details=True,
                                   top_n_tokens=2)
    assert detailed.generated_text == ref
    assert detailed.details.generated_tokens == len(detailed.details.tokens) >= 1
    assert detailed.details.finish_reason in ("length", "eos_token")
    assert [t.text for t in detailed.details.prefill] == ["The", " sky", " is"]
    assert detailed.details.prefill[0].logprob is None and detailed.details.prefill[1].logprob < 0
    assert all(len(top) == 2 for top in detailed.details.top_tokens)
    streamed = list(hub.text_generation("The sky is", max_new_tokens=5, stream=True, details=True))
    assert streamed[-1].details.generated_tokens == 5 and streamed[-1].generated_text is not None
    assert all(s.token.logprob is not None for s in streamed)
    full = hub.text_generation("The sky is", max_new_tokens=5, return_full_text=True)
    assert full.startswith("The sky is")
    sampled = hub.text_generation("The sky is", max_new_tokens=5, do_sample=True, temperature=0.7, seed=4)
    assert sampled == hub.text_generation("The sky is", max_new_tokens=5, do_sample=True, temperature=0.7, seed=4)


def test_tgi_generate_and_info(lm, http):
    r = http.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "details": True,
                                                                    "stop": ["zzz"]}})
    body = r.json()
    assert body["generated_text"] == lm.generate("Hi", max_new_tokens=4, temperature=0)
    assert len(body["details"]["tokens"]) == body["details"]["generated_tokens"]
    with http.stream("POST", "/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["details"]["generated_tokens"] == len(events) and events[0]["details"] is None
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == body["generated_text"]
    info = http.get("/info").json()
    assert info["model_id"] == "EleutherAI/gpt-j-6B" and info["max_total_tokens"] == 128
    assert info["max_input_tokens"] == 127 and info["model_device_type"] == "cpu"
    bad = http.post("/generate", json={"inputs": ["a", "b"]})
    assert bad.status_code == 422 and bad.json()["error_type"] == "validation"


def test_tgi_typical_p_and_best_of(lm, http):
    params = {"max_new_tokens": 6, "typical_p": 0.5, "seed": 4}
    r = http.post("/generate", json={"inputs": "Hi", "parameters": params})
    assert r.json()["generated_text"] == lm.generate("Hi", max_new_tokens=6, temperature=1.0, top_p=1.0,
                                                     typical_p=0.5, seed=4)
    params = {"max_new_tokens": 5, "do_sample": True, "best_of": 3, "seed": 2, "details": True}
    body = http.post("/generate", json={"inputs": "Hi", "parameters": params}).json()
    samples = lm.complete("Hi", max_new_tokens=5, temperature=1.0, top_p=1.0, seed=2, num_return_sequences=3,
                          logprobs=0)
    ranked = sorted(samples, key=lambda c: -sum(c.logprobs) / len(c.logprobs))
    assert body["generated_text"] == ranked[0].text
    others = body["details"]["best_of_sequences"]
    assert [o["generated_text"] for o in others] == [c.text for c in ranked[1:]]
    assert all(o["generated_tokens"] == len(o["tokens"]) for o in others)
    assert http.get("/info").json()["max_best_of"] >= 3


def test_tgi_unknown_adapter_is_404(http):
    r = http.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_tgi_grammar_regex_and_json(hub, http):
    import re

    for seed in range(3):
        out = hub.text_generation("Call", max_new_tokens=30, seed=seed, do_sample=True,
                                  grammar={"type": "regex", "value": r"\d{3}-\d{4}"})
        assert re.fullmatch(r"\d{3}-\d{4}", out), out
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = http.post("/generate", json={"inputs": "x", "parameters": {
        "max_new_tokens": 30, "grammar": {"type": "json", "value": json.dumps(schema)}}}).json()
    assert isinstance(json.loads(body["generated_text"])["ok"], bool)
    bad = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(("}}})
    assert bad.status_code == 400 and "grammar" in bad.json()["error"]
