"""Embeddings on a real server: bounded requests, embedded in pieces between decode steps so running streams keep
flowing, equal to LanguageModel.embed; and the Hugging Face feature-extraction forms, as huggingface_hub's
InferenceClient calls them."""

import threading

import httpx
import numpy as np
import pytest
import torch
from huggingface_hub import InferenceClient

from neoj.server.embeddings import MAX_INPUTS, MAX_TOTAL_TOKENS, PIECE_TOKENS

KEY = "embed-key"
MODEL = "EleutherAI/gpt-neo-125m"
N_POSITIONS = 2048
TEXTS = ["The sky is blue.", "def f(x):\n    return x * 2", "Hello"]


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(n_positions=N_POSITIONS, layers=2, model_id=MODEL, api_key=KEY)


@pytest.fixture(scope="module")
def lm(server):
    return server.lm


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def vectors(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_a_running_stream_keeps_getting_tokens_while_many_inputs_are_embedded(server, lm, http):
    # Inputs just over half a piece each: every input is a piece of its own, and the engine runs one piece per
    # decode step, so the stream gets a token between every two of the 64 inputs. Embedded all at once, as
    # before, the stream would get nothing between the request's start and its end.
    count = 64
    texts = [f"{i}: " + "word " * (PIECE_TOKENS // 2 + 4) for i in range(count)]
    log: list[str] = []  # the order things happened in, appended from two threads
    ended = threading.Event()
    body = {"prompt": "Once upon a time", "max_tokens": N_POSITIONS - 16, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as streamer:
        with streamer.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the stream runs

            def read():
                for line in lines:
                    if line.startswith("data:"):
                        log.append("token")
                    if ended.is_set():
                        return

            reader = threading.Thread(target=read)
            reader.start()
            log.append("start")
            got = vectors(http.post("/v1/embeddings", json={"input": texts}))
            log.append("end")
            ended.set()
            reader.join(60)
    during = log[log.index("start") : log.index("end")].count("token")
    assert during >= count // 4, f"the stream got {during} tokens while {count} inputs were embedded"
    assert log[log.index("end") :].count("token") >= 1  # still streaming after it: it outlasted the request
    alone = lm.embed(texts).numpy()
    assert got.shape == (count, lm.config.hidden_size)
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_inputs_are_capped(lm, http):
    limit = http.post("/v1/embeddings", json={"input": ["x"] * (MAX_INPUTS + 1)})
    assert limit.status_code == 422 and limit.json()["error"]["param"] == "input"
    assert str(MAX_INPUTS) in limit.json()["error"]["message"]
    assert http.post("/v1/embeddings", json={"input": [[1, 2]] * (MAX_INPUTS + 1)}).status_code == 422
    ids = http.post("/v1/embeddings", json={"input": [[1, 2]] * MAX_INPUTS})
    assert vectors(ids).shape == (MAX_INPUTS, lm.config.hidden_size)
    long = http.post("/v1/embeddings", json={"input": ["a", "word " * (N_POSITIONS + 10)]})
    assert long.status_code == 400 and f"{N_POSITIONS} tokens" in long.json()["error"]["message"]
    words = MAX_TOTAL_TOKENS // 1000 + 1
    total = http.post("/v1/embeddings", json={"input": ["word " * 1000] * words})
    assert total.status_code == 400 and f"at most {MAX_TOTAL_TOKENS}" in total.json()["error"]["message"]
    hf = http.post("/embed", json={"inputs": ["x"] * (MAX_INPUTS + 1)})
    assert hf.status_code == 422 and str(MAX_INPUTS) in hf.json()["error"] and "inputs" in hf.json()["error"]


def test_inference_client_feature_extraction_gets_embeddings(server, lm):
    # InferenceClient(base_url).feature_extraction posts {"inputs", ...options} to the base URL itself: POST /.
    hub = InferenceClient(base_url=server.url, api_key=KEY)
    one = hub.feature_extraction(TEXTS[0])
    assert one.shape == (1, lm.config.hidden_size)  # TEI's shape: one vector per input
    np.testing.assert_allclose(one, lm.embed(TEXTS[0]).numpy(), atol=1e-5)
    several = hub.feature_extraction(TEXTS)
    np.testing.assert_allclose(several, lm.embed(TEXTS).numpy(), atol=1e-5)
    unit = hub.feature_extraction(TEXTS, normalize=True)
    np.testing.assert_allclose(unit, torch.nn.functional.normalize(lm.embed(TEXTS), dim=-1).numpy(), atol=1e-5)
    # The same client still generates at POST /: text_generation always sends "parameters" and "stream".
    assert isinstance(hub.text_generation("Hello", max_new_tokens=3), str)
    # The Inference API's URLs for a model, as InferenceClient(model=URL) posts to them.
    for url in (f"{server.url}/models/{MODEL}/pipeline/feature-extraction",
                f"{server.url}/pipeline/feature-extraction/{MODEL}"):
        np.testing.assert_allclose(InferenceClient(model=url, api_key=KEY).feature_extraction(TEXTS),
                                   several, atol=1e-6)


def test_feature_extraction_forms_and_errors(lm, http):
    ref = lm.embed(TEXTS).numpy()
    for path in ("/embed", "/", f"/models/{MODEL}/pipeline/feature-extraction",
                 "/pipeline/feature-extraction/gpt-neo-125m"):
        r = http.post(path, json={"inputs": TEXTS, "options": {"wait_for_model": True}})
        assert r.status_code == 200, (path, r.text)
        np.testing.assert_allclose(np.array(r.json(), dtype=np.float32), ref, atol=1e-5)
    # POST /models/{id}: feature-extraction options at the top level mean embeddings, a bare body generation.
    features = http.post(f"/models/{MODEL}", json={"inputs": TEXTS[0], "normalize": False})
    np.testing.assert_allclose(np.array(features.json(), dtype=np.float32), ref[:1], atol=1e-5)
    generated = http.post(f"/models/{MODEL}", json={"inputs": TEXTS[0]})
    assert generated.json()[0]["generated_text"].startswith(TEXTS[0])
    # truncate keeps the first tokens, or the last (as LanguageModel.embed) with truncation_direction "left".
    long = "word " * 10 + "end " * (N_POSITIONS + 5)
    too_long = http.post("/", json={"inputs": long})
    assert too_long.status_code == 400 and f"{N_POSITIONS} tokens" in too_long.json()["error"]
    assert "truncate" in too_long.json()["error"]
    left = http.post("/", json={"inputs": long, "truncate": True, "truncation_direction": "left"})
    np.testing.assert_allclose(np.array(left.json(), dtype=np.float32), lm.embed(long).numpy(), atol=1e-5)
    right = http.post("/", json={"inputs": long, "truncate": True})
    first = lm.tokenizer.decode(lm.tokenizer.encode(long)[:N_POSITIONS])
    np.testing.assert_allclose(np.array(right.json(), dtype=np.float32), lm.embed(first).numpy(), atol=1e-4)
    for body, field in [({"inputs": "x", "prompt_name": "query"}, "prompt_name"),
                        ({"inputs": "x", "dimensions": 7}, "dimensions"),
                        ({"inputs": "x", "encoding_format": "base64"}, "encoding_format"),
                        ({"inputs": ""}, "inputs"), ({"inputs": []}, "inputs"),
                        ({"inputs": "x", "normalize": "yes"}, "normalize")]:
        r = http.post("/", json=body)
        assert r.status_code == 422 and field in r.json()["error"], (body, r.text)
    assert http.post("/models/gpt-j-6b/pipeline/feature-extraction", json={"inputs": "x"}).status_code == 404
    assert http.post("/pipeline/feature-extraction/gpt-j-6b", json={"inputs": "x"}).status_code == 404
