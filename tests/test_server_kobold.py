"""The KoboldAI API on a real server, called with the bodies SillyTavern and KoboldAI Lite send.

The request bodies below are written from reading the clients: SillyTavern's src/endpoints/backends/kobold.js
(the fields its server forwards to /api/v1/generate and /api/extra/generate/stream, and its bare
POST /api/extra/abort), public/scripts/kai-settings.js (getKoboldGenerationData's defaults), and KoboldAI Lite's
index.html (the payload it flattens from "params", with memory, trim_stop and genkey, its generate/check polls
and its {"genkey"} aborts).
"""

import json
import re
import threading
import time

import httpx
import pytest

from neoj.generate import generate_batch
from neoj.sampling import GenerationParams

KEY = "kobold-key"
MODEL = "EleutherAI/gpt-neo-125m"
EOS = 50256
NEWLINE = 198  # "\n" in GPT-2's vocabulary
FRAME = re.compile(r"event: message\ndata: (.*)\n\n")

# What SillyTavern's server posts for its KoboldAI (classic) backend with its default settings (a stop
# string per character; sampler_seed only when set; undefined fields are dropped by JSON.stringify).
SILLYTAVERN = {
    "prompt": "You: Hello\nBot:", "use_story": False, "use_memory": False, "use_authors_note": False,
    "use_world_info": False, "max_context_length": 2048, "max_length": 12, "rep_pen": 1, "rep_pen_range": 0,
    "rep_pen_slope": 0.9, "temperature": 0, "tfs": 1, "top_a": 1, "top_k": 0, "top_p": 1, "min_p": 0,
    "typical": 1, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False, "use_default_badwordsids": False,
    "mirostat": 0, "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "", "stop_sequence": ["\nYou:"],
}

# What KoboldAI Lite posts to a KoboldCpp 1.49+ endpoint: its "params" flattened with the prompt, memory sent
# apart (trim_stop then on), a genkey for polling and abort, and the extra samplers it sends to such a version.
LITE = {
    "n": 1, "max_context_length": 2048, "max_length": 10, "rep_pen": 1.07, "temperature": 0.7, "top_p": 0.92,
    "top_k": 100, "top_a": 0, "typical": 1, "tfs": 1, "rep_pen_range": 360, "rep_pen_slope": 0.7,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "memory": "[The story of a fox]\n", "trim_stop": True,
    "sampler_seed": 1234, "genkey": "KCPP4321", "min_p": 0, "dynatemp_range": 0, "dynatemp_exponent": 1,
    "smoothing_factor": 0, "smoothing_curve": 1, "nsigma": 0, "banned_tokens": [], "render_special": False,
    "logprobs": False, "presence_penalty": 0, "logit_bias": {}, "stop_sequence": ["{{[INPUT]}}", "{{[OUTPUT]}}"],
    "use_default_badwordsids": False, "bypass_eos": False, "prompt": "Once upon a time",
}


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(model_id=MODEL, api_key=KEY)


@pytest.fixture(scope="module")
def lm(server):
    return server.lm


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def library(lm, ids: list[int], **options):
    """Returns neoj's own Completion for token ids under the given GenerationParams fields."""
    return generate_batch(lm.model, lm.tokenizer, [ids], GenerationParams(**options).validated())[0]


def generate(http, body: dict) -> dict:
    r = http.post("/api/v1/generate", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 1
    return results[0]


def stream(http, body: dict) -> tuple[list[dict], str]:
    """Returns the stream's events and its raw text, checking every byte is koboldcpp's framing."""
    with http.stream("POST", "/api/extra/generate/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode("utf-8")
    assert FRAME.sub("", raw) == ""  # nothing but "event: message\ndata: {json}\n\n" frames
    return [json.loads(d) for d in FRAME.findall(raw)], raw


def test_info_routes_as_the_clients_read_them(http):
    assert http.get("/api/v1/model").json() == {"result": MODEL}
    assert http.get("/api/latest/model").json() == {"result": MODEL}
    assert http.get("/api/v1/info/version").json() == {"result": "1.2.5"}
    assert http.get("/api/v1/config/max_context_length").json() == {"value": 128}
    assert http.get("/api/v1/config/max_length").json() == {"value": 64}
    assert http.get("/api/extra/true_max_context_length").json() == {"value": 128}
    version = http.get("/api/extra/version").json()
    # SillyTavern reads "result", Lite "version", and each turns on streaming, tokencount and abort by them.
    assert version["result"] == "KoboldCpp" and version["version"] == "1.49" and version["protected"] is True
    assert version["server"] == "neoj"


def test_sillytavern_body_is_greedy_like_the_library(lm, http):
    out = generate(http, SILLYTAVERN)
    ref = library(lm, lm.tokenizer.encode(SILLYTAVERN["prompt"]), max_new_tokens=12, temperature=0,
                  stop=["\nYou:"])
    assert out == {"text": ref.text, "finish_reason": ref.finish_reason} and ref.finish_reason == "length"


def test_lite_body_samples_like_the_library(lm, http):
    out = generate(http, LITE)
    tok = lm.tokenizer
    ids = tok.encode(LITE["memory"]) + tok.encode(LITE["prompt"])  # memory goes in front, tokenized apart
    ref = library(lm, ids, max_new_tokens=10, temperature=0.7, top_p=0.92, top_k=100, repetition_penalty=1.07,
                  seed=1234, stop=list(LITE["stop_sequence"]))
    assert out["text"] == ref.text
    # Lax types, as KoboldAI's marshmallow reads them: numbers as strings, a float top_k that is whole.
    assert generate(http, {**LITE, "temperature": "0.7", "max_length": "10", "top_k": 100.0})["text"] == ref.text


def test_samplers_map_to_neojs(lm, http):
    ids = lm.tokenizer.encode("Hello world")
    body = {"prompt": "Hello world", "max_length": 8, "sampler_seed": 7, "temperature": 1.3, "top_k": 0, "top_p": 1,
            "min_p": 0.05, "typical": 0.6, "rep_pen": 1.2, "presence_penalty": 0.5, "tfs": 0.9, "top_a": 0.2}
    ref = library(lm, ids, max_new_tokens=8, seed=7, temperature=1.3, min_p=0.05, typical_p=0.6,
                  repetition_penalty=1.2, presence_penalty=0.5)
    assert generate(http, body)["text"] == ref.text
    # Left out: koboldcpp's defaults (temperature 0.7, top_k 100, top_p 0.92, rep_pen 1).
    ref = library(lm, ids, max_new_tokens=8, seed=7, temperature=0.7, top_k=100, top_p=0.92)
    assert generate(http, {"prompt": "Hello world", "max_length": 8, "sampler_seed": 7})["text"] == ref.text
    # top_p 0 keeps the best token only (llama.cpp's rule); a seed beyond neoj's range folds into it.
    greedy = library(lm, ids, max_new_tokens=8, temperature=0).text
    assert generate(http, {**body, "top_p": 0, "min_p": 0, "typical": 1, "rep_pen": 1, "presence_penalty": 0,
                           "sampler_seed": 2**64 - 1})["text"] == greedy


def test_max_context_length_keeps_the_prompts_last_tokens(lm, http):
    tok = lm.tokenizer
    prompt = " ".join(f"word{i}" for i in range(60))
    ids = tok.encode(prompt)
    body = {"prompt": prompt, "max_context_length": 40, "max_length": 6, "temperature": 0}
    assert generate(http, body)["text"] == library(lm, ids[-34:], max_new_tokens=6, temperature=0).text
    # max_length near the context leaves the prompt 16 tokens (koboldcpp's rule); memory stays in front.
    body = {"prompt": prompt, "memory": "Memory: ", "max_context_length": 30, "max_length": 100, "temperature": 0}
    ref = library(lm, tok.encode("Memory: ") + ids[-(16 - len(tok.encode("Memory: "))):], max_new_tokens=14,
                  temperature=0)
    assert generate(http, body) == {"text": ref.text, "finish_reason": "length"}
    # Longer than the model's context (128) whatever max_context_length says: truncated, never an error.
    long = {"prompt": prompt * 4, "max_context_length": 4096, "max_length": 8, "temperature": 0}
    assert generate(http, long)["text"] == library(lm, tok.encode(prompt * 4)[-120:], max_new_tokens=8,
                                                   temperature=0).text
    # An empty prompt starts from <|endoftext|>, GPT-2's start of text.
    empty = {"prompt": "", "max_length": 4, "temperature": 0}
    assert generate(http, empty)["text"] == library(lm, [EOS], max_new_tokens=4, temperature=0).text


def test_stop_sequence_singleline_and_trim_stop(lm, http):
    base = {"prompt": "Once upon a time", "max_length": 30, "temperature": 0}
    full = generate(http, base)["text"]
    assert full.startswith(" chuck chuck") and " Iran" in full
    head = full[: full.index(" Iran")]
    # KoboldAI returns the stop string; koboldcpp's trim_stop (Lite sends it) leaves it out.
    stopped = generate(http, {**base, "stop_sequence": [" Iran", "zzz"]})
    assert stopped == {"text": head + " Iran", "finish_reason": "stop"}
    assert generate(http, {**base, "stop_sequence": [" Iran"], "trim_stop": True})["text"] == head
    events, _ = stream(http, {**base, "stop_sequence": [" Iran"]})
    assert "".join(e["token"] for e in events) == head + " Iran"
    # singleline: the first line only, without its newline (a bias makes the model write one).
    newline = {**base, "logit_bias": {str(NEWLINE): 100}, "singleline": True}
    assert generate(http, newline) == {"text": "", "finish_reason": "stop"}
    assert generate(http, {**newline, "singleline": False, "max_length": 3})["text"] == "\n\n\n"


def test_use_default_badwordsids_bans_eos(lm, http):
    body = {"prompt": "Hello world", "max_length": 5, "temperature": 0, "logit_bias": {str(EOS): 100}}
    assert generate(http, body) == {"text": "", "finish_reason": "stop"}  # EOS first: nothing generated
    banned = generate(http, {**body, "use_default_badwordsids": True})
    assert banned["finish_reason"] == "length" and banned["text"]
    assert generate(http, {**body, "ban_eos_token": True}) == banned  # koboldcpp's name for the same


def test_stream_is_koboldcpps_framing_and_equals_generate(http):
    body = {**SILLYTAVERN, "max_length": 10}
    events, raw = stream(http, body)
    assert raw.startswith("event: message\ndata: {")
    assert all(e["finish_reason"] is None for e in events[:-1]) and events[-1]["finish_reason"] == "length"
    assert len(events) > 2 and all(set(e) == {"token", "finish_reason"} for e in events)
    assert "".join(e["token"] for e in events) == generate(http, body)["text"]
    metrics = http.get("/metrics").text  # each route under its own label
    for route in ("/api/v1/generate", "/api/extra/generate/stream"):
        assert f'neoj_http_requests_total{{route="{route}",status="200"}}' in metrics
        assert f'neoj_request_duration_seconds_count{{route="{route}"}}' in metrics


def test_abort_ends_a_stream_and_a_generate(lm, http):
    body = {"prompt": "Once upon a time", "max_length": 110, "temperature": 0, "genkey": "KCPP1111"}
    full = {p: library(lm, lm.tokenizer.encode(p), max_new_tokens=110, temperature=0).text
            for p in ("Once upon a time", "Hello world")}
    text = ""
    with http.stream("POST", "/api/extra/generate/stream", json=body) as r:
        for chunk in r.iter_text():
            if not text:  # the first piece arrived: stop it, as Lite does
                assert http.post("/api/extra/abort", json={"genkey": "KCPP1111"}).json()["success"] == "true"
            text += chunk
    tokens = "".join(json.loads(d)["token"] for d in FRAME.findall(text))
    assert full["Once upon a time"].startswith(tokens) and len(tokens) < len(full["Once upon a time"])
    # SillyTavern aborts with a bare POST (no body): the caller's latest generation stops, and its answer is
    # the text so far.
    answer = {}
    other = {**body, "genkey": None, "prompt": "Hello world"}  # its text starts "oyer", unlike the stream's
    worker = threading.Thread(target=lambda: answer.update(generate(http, other)))
    worker.start()
    deadline = time.monotonic() + 30
    while not http.post("/api/extra/generate/check").json()["results"][0]["text"].startswith("oyer"):
        assert time.monotonic() < deadline
    assert http.post("/api/extra/abort").json() == {"success": "true", "done": "true"}
    worker.join(30)
    assert full["Hello world"].startswith(answer["text"]) and 0 < len(answer["text"]) < len(full["Hello world"])
    assert http.post("/api/extra/abort", json={"genkey": "nobody"}).json()["success"] == "false"


def test_generate_check_polls_the_text_so_far(http):
    body = {**LITE, "max_length": 60, "genkey": "KCPP2222", "prompt": "Hello world"}
    answer, polled = {}, []
    worker = threading.Thread(target=lambda: answer.update(generate(http, body)))
    worker.start()
    while worker.is_alive():
        polled.append(http.post("/api/extra/generate/check", json={"genkey": "KCPP2222"}).json()["results"][0]["text"])
        time.sleep(0.01)
    worker.join()
    assert all(answer["text"].startswith(p) for p in polled)
    assert any(0 < len(p) < len(answer["text"]) for p in polled)  # seen mid-generation
    assert http.get("/api/extra/generate/check").json()["results"][0]["text"] in (answer["text"], "")
    check = http.post("/api/extra/generate/check", json={"genkey": "KCPP2222"}).json()
    assert check == {"results": [{"text": answer["text"]}]}  # kept after the end, for Lite's recovery
    assert http.post("/api/extra/generate/check", json={"genkey": "other"}).json() == {"results": [{"text": ""}]}


def test_tokencount_ids_are_the_tokenizers(lm, http):
    text = "The café on the corner, 東京"
    out = http.post("/api/extra/tokencount", json={"prompt": text, "special": False}).json()
    assert out == {"value": len(lm.tokenizer.encode(text)), "ids": lm.tokenizer.encode(text)}
    assert http.post("/api/extra/tokencount", json={"prompt": ""}).json() == {"value": 0, "ids": []}


def kobold_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert set(detail) == {"msg", "type"} and detail["msg"]
    return detail


def test_errors_are_koboldais_shape(server, http):
    for bad in ({"prompt": "x", "temperature": "hot"}, {"prompt": 5}, {"max_length": 5}, {"prompt": "x", "n": 6},
                {"prompt": "x", "top_p": 2}, {"prompt": "x", "stop_sequence": "x"}, {"prompt": "x", "sampler_seed": -2},
                {"prompt": "x", "logit_bias": {"abc": 1}}, {"prompt": "x", "max_context_length": 1}):
        detail = kobold_error(http.post("/api/v1/generate", json=bad), 422)
        assert detail["type"] == "bad_input"
    nan = http.post("/api/v1/generate", content=b'{"prompt": "x", "temperature": NaN}')
    assert "temperature" in kobold_error(nan, 422)["msg"]
    assert kobold_error(http.post("/api/v1/generate", content=b"{oops"), 400)["type"] == "bad_input"
    assert kobold_error(http.post("/api/extra/generate/stream", json={**SILLYTAVERN, "n": 2}), 422)["msg"]
    assert kobold_error(http.get("/api/v1/nothing"), 404)["type"] == "generic.error_404"
    for method, path in (("GET", "/api/v1/model"), ("POST", "/api/v1/generate"), ("POST", "/api/extra/abort"),
                         ("GET", "/api/extra/version"), ("POST", "/api/extra/tokencount")):
        r = httpx.request(method, server.url + path, json={"prompt": "x"}, headers={"Authorization": "Bearer no"})
        assert kobold_error(r, 401)["type"] == "unauthorized"


def test_grammar_constrains_the_text(http):
    body = {"prompt": "Is it raining? Answer:", "max_length": 8, "temperature": 0,
            "grammar": 'root ::= " yes" | " no"'}
    assert generate(http, body)["text"] in (" yes", " no")
    assert kobold_error(http.post("/api/v1/generate", json={**body, "grammar": "root ::= ("}), 400)["msg"]


def test_a_browser_page_reaches_the_server_only_from_an_allowed_origin(serve_tiny, server):
    lite = "https://lite.koboldai.net"
    allowed = serve_tiny(model_id=MODEL, api_key=KEY, allow_origins=[lite])
    preflight = {"Origin": lite, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(allowed.url + "/api/v1/generate", headers=preflight)  # no key: browsers send none here
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == lite
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(allowed.url + "/api/v1/model", headers={"Origin": lite, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == lite
    other = httpx.get(allowed.url + "/api/v1/model", headers={"Origin": "https://evil.example",
                                                              "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers
    # By default no origin is allowed: a page of another site cannot read the answers.
    r = httpx.get(server.url + "/api/v1/model", headers={"Origin": lite, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
