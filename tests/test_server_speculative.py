"""Prefix caching and speculative decoding seen from HTTP clients: a real server on a loopback port whose model
speculates by prompt lookup. The per-request opt-out ("speculative": false) changes no greedy text and drafts
nothing; OpenAI's usage.prompt_tokens_details.cached_tokens, neoj's usage.speculative and TGI's details report
what the engine did; /metrics counts it under vLLM's names."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

import neoj
from conftest import tiny_server_config
from neoj.config import from_hf_dict
from neoj.server import run_in_thread

# Repetitive text: prompt lookup finds its last tokens earlier in it, so every request has guesses to verify.
REPEATING = "one two three four five six seven eight nine ten " * 4
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+\-]+|\+Inf|NaN)$')


@pytest.fixture(scope="module")
def lm():
    """A tiny random GPT-Neo (256 positions) that speculates by prompt lookup on every step, with the default prefix
    cache. Adaptive speculation is off: its on/off choice follows measured step times, which on a loaded machine
    can pause drafting for a whole request and make the reports below depend on timing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = neoj.from_config(from_hf_dict(tiny_server_config(256, 2)), dtype="float32", device="cpu")
    model.speculative = neoj.Speculative("prompt_lookup", adaptive=False)
    yield model
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(lm):
    with run_in_thread(lm) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def scrape(client: httpx.Client) -> dict[str, float]:
    """Returns /metrics' samples by name (labels dropped), checking each line's format."""
    samples = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        samples[match.group(1)] = float(match.group(3))
    return samples


def complete(client: httpx.Client, prompt: str, **extra) -> dict:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, **extra}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tgi(client: httpx.Client, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True, **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_opt_out_keeps_the_greedy_text_and_drafts_nothing(lm, client):
    """Greedy text with and without speculation equals the library's unspeculated text; the opted-out request
    reports no speculation, the speculated one its guesses."""
    reference = lm.generate(REPEATING, max_new_tokens=24, temperature=0, stop_at_eos=False, speculative=False)
    on = complete(client, REPEATING)
    off = complete(client, REPEATING, speculative=False)
    assert on["choices"][0]["text"] == off["choices"][0]["text"] == reference
    assert "speculative" not in off["usage"]
    spec = on["usage"]["speculative"]
    assert 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"] and spec["drafted_tokens"] > 0
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["drafted_tokens"])
    details = tgi(client, REPEATING, speculative=False)["details"]
    assert details["drafted_tokens"] == details["accepted_tokens"] == 0 and details["acceptance_rate"] is None
    assert tgi(client, REPEATING)["generated_text"] == reference  # TGI answers the new text only


def test_tgi_details_report_speculation_and_cached_tokens(client):
    out = tgi(client, "TGI details: " + REPEATING)
    details = out["details"]
    assert details["drafted_tokens"] > 0 and 0 <= details["accepted_tokens"] <= details["drafted_tokens"]
    assert details["acceptance_rate"] == pytest.approx(details["accepted_tokens"] / details["drafted_tokens"])
    assert isinstance(details["cached_tokens"], int)
    again = tgi(client, "TGI details: " + REPEATING)["details"]
    assert again["cached_tokens"] >= 16  # at least one block of the same prompt, reused


def test_repeated_prompt_reports_cached_tokens(client):
    """The second request with a prompt reuses its prefix (whole 16-token blocks, never the last prompt token);
    cached_tokens counts each prompt once, as prompt_tokens does, whatever n is."""
    prompt = "A shared system prompt for the cache test. " * 6
    first = complete(client, prompt)["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    second = complete(client, prompt, n=2, temperature=0.7, seed=1)["usage"]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 16 <= cached <= first["prompt_tokens"] - 1 and cached % 16 == 0
    assert second["prompt_tokens"] == first["prompt_tokens"]


def test_chat_and_streams_carry_the_fields(client):
    body = {"messages": [{"role": "user", "content": REPEATING}], "max_tokens": 8, "temperature": 0,
            "speculative": False}
    chat = client.post("/v1/chat/completions", json=body)
    assert chat.status_code == 200, chat.text
    assert "cached_tokens" in chat.json()["usage"]["prompt_tokens_details"]
    assert "speculative" not in chat.json()["usage"]
    stream = {"prompt": REPEATING, "max_tokens": 8, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=stream) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    usage = json.loads(events[-2])["usage"]
    assert "cached_tokens" in usage["prompt_tokens_details"]
    tgi_stream = {"inputs": REPEATING, "parameters": {"max_new_tokens": 8}}
    with client.stream("POST", "/generate_stream", json=tgi_stream) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    final = events[-1]["details"]
    assert {"cached_tokens", "drafted_tokens", "accepted_tokens", "acceptance_rate"} <= set(final)


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "speculative": "no"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "speculative": 0}),
    ("/generate", {"inputs": "hi", "parameters": {"speculative": "false"}}),
])
def test_speculative_must_be_a_boolean(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 422 and "speculative" in response.text


def test_metrics_count_prefix_hits_and_speculation(client):
    before = scrape(client)
    prompt = "Metrics: a prefix long enough for a few blocks of the cache. " * 4
    complete(client, prompt, max_tokens=2)
    complete(client, prompt, max_tokens=2)
    after = scrape(client)
    assert after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"] >= 16
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] >= 16
    assert after["neoj_prefix_cache_used_bytes"] > 0
    assert after["neoj_prefix_cache_max_bytes"] == 512 * 2**20
    assert 0 < after["neoj_prefix_cache_hit_rate"] <= 1
    complete(client, "Speculated: " + REPEATING)
    spec = scrape(client)
    assert spec["vllm:spec_decode_num_drafts_total"] > after["vllm:spec_decode_num_drafts_total"]
    drafted = spec["vllm:spec_decode_num_draft_tokens_total"] - after["vllm:spec_decode_num_draft_tokens_total"]
    accepted = spec["vllm:spec_decode_num_accepted_tokens_total"] - after["vllm:spec_decode_num_accepted_tokens_total"]
    assert drafted > 0 and 0 <= accepted <= drafted
    assert spec["neoj_spec_decode_acceptance_rate"] == pytest.approx(
        spec["vllm:spec_decode_num_accepted_tokens_total"] / spec["vllm:spec_decode_num_draft_tokens_total"])
    opted_out = scrape(client)
    complete(client, "Not speculated: " + REPEATING, speculative=False)
    assert scrape(client)["vllm:spec_decode_num_draft_tokens_total"] == opted_out["vllm:spec_decode_num_draft_tokens_total"]


def test_a_server_without_prefix_cache_or_speculation(lm):
    """lm.prefix_cache = None and lm.speculative = None when the app is created: nothing cached or drafted."""
    cache, speculative = lm.prefix_cache, lm.speculative
    lm.prefix_cache, lm.speculative = None, None
    try:
        with run_in_thread(lm) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
            prompt = "No cache here. " * 12
            complete(c, prompt)
            usage = complete(c, prompt)["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 0} and "speculative" not in usage
            samples = scrape(c)
            assert samples["neoj_prefix_cache_max_bytes"] == 0 and samples["vllm:prefix_cache_hits_total"] == 0
            assert samples["vllm:spec_decode_num_draft_tokens_total"] == 0
    finally:
        lm.prefix_cache, lm.speculative = cache, speculative


# ---- the same features in the library ----

def test_library_speculative_argument(lm):
    """speculative=False opts a call out of lm.speculative; "prompt_lookup" (or a Speculative) replaces it for one
    call; the greedy text never changes, and each Completion says what was drafted and reused."""
    saved = lm.speculative
    try:
        off = lm.complete(REPEATING, max_new_tokens=16, temperature=0, speculative=False)[0]
        assert off.drafted_tokens == 0 and off.acceptance_rate is None
        lm.speculative = None
        assert lm.speculative is None
        on = lm.complete(REPEATING, max_new_tokens=16, temperature=0, speculative="prompt_lookup")[0]
        assert on.text == off.text and on.drafted_tokens > 0
        assert on.acceptance_rate == on.accepted_tokens / on.drafted_tokens
        assert "".join(lm.stream(REPEATING, max_new_tokens=16, temperature=0,
                                 speculative=neoj.Speculative(num_tokens=2))) == off.text
        plain = lm.complete(REPEATING, max_new_tokens=16, temperature=0)[0]
        assert plain.text == off.text and plain.drafted_tokens == 0
        lm.speculative = "prompt_lookup"
        assert isinstance(lm.speculative, neoj.Speculative) and lm.speculative.method == "prompt_lookup"
        with pytest.raises(neoj.NeojError, match="speculative"):
            lm.complete("hi", speculative="guess")
    finally:
        lm.speculative = saved


def test_library_prefix_cache_serves_a_chat_session(lm):
    """A ChatSession's second turn starts with the first turn's prompt: its prefix comes from lm.prefix_cache."""
    from neoj.tasks import ChatSession

    saved = lm.prefix_cache
    lm.prefix_cache = neoj.PrefixCache.megabytes(8)
    try:
        session = ChatSession(lm, system="You are a test. " * 8, max_new_tokens=4)
        session.send("Hello there, how are you today?")
        hits = lm.prefix_cache.hit_tokens
        session.send("And tomorrow?")
        assert lm.prefix_cache.hit_tokens - hits >= 16 and lm.prefix_cache.used_bytes > 0
        completion = lm.complete("You are a test. " * 8, max_new_tokens=1)[0]
        assert completion.cached_tokens >= 16
    finally:
        lm.prefix_cache = saved
