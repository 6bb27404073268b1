"""Continuous batching through the server: concurrent clients get what they get alone; gone clients free slots."""

import asyncio
import time

import httpx
import openai
import pytest

CLIENTS = 32


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(n_positions=2048, model_id="tiny", max_batch=CLIENTS, max_queue=CLIENTS)


def requests_for(i: int) -> dict:
    """Distinct prompts and lengths, several longer than the local window, some longer than others' outputs."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    prompt = f"Client {i} says: " + " ".join(words[(i + k) % 8] for k in range(i % 11))
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8 + (i * 5) % 33, "temperature": 0,
            "extra_body": {"ignore_eos": i % 2 == 0}}


def test_32_concurrent_streaming_clients_get_what_they_get_alone(server):
    async def stream(client, kw):
        pieces = []
        async for chunk in await client.completions.create(stream=True, **kw):
            pieces.append(chunk.choices[0].text)
        return "".join(pieces)

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            alone = [await stream(client, requests_for(i)) for i in range(CLIENTS)]
            together = await asyncio.gather(*(stream(client, requests_for(i)) for i in range(CLIENTS)))
            return alone, together

    engine = server.app.state.neoj.engine
    steps_before = engine.stats.steps
    alone, together = asyncio.run(main())
    assert together == alone
    assert all(alone)
    # They really were batched: far fewer decode steps than tokens.
    tokens = sum(requests_for(i)["max_tokens"] for i in range(CLIENTS))
    assert engine.stats.steps - steps_before < 2 * tokens * 0.9


def _wait_until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_a_disconnected_client_frees_its_slot(server):
    engine = server.app.state.neoj.engine
    stats = engine.stats
    cancelled = stats.finished["cancelled"]
    long = {"model": "tiny", "prompt": "a", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    # Streaming: read a little, then hang up.
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            assert _wait_until(lambda: stats.running == 1)
    assert _wait_until(lambda: stats.running == 0 and stats.finished["cancelled"] == cancelled + 1)
    # Not streaming: the client times out and goes away while its request runs.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long, timeout=0.5)
    assert _wait_until(lambda: stats.running == 0 and stats.finished["cancelled"] == cancelled + 2)
    # TGI streaming, through huggingface_hub's own parser of the stream, dropped after two tokens.
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=server.url)
    stream = hub.text_generation("a", max_new_tokens=2000, stream=True)
    next(stream)
    next(stream)
    hub.close()  # closes the response the stream reads
    assert _wait_until(lambda: stats.running == 0 and stats.finished["cancelled"] == cancelled + 3)


def test_max_time_ends_a_request_early(server):
    r = httpx.post(server.url + "/generate", timeout=60, json={
        "inputs": "a", "parameters": {"max_new_tokens": 2000, "max_time": 0.05, "details": True}})
    details = r.json()["details"]
    assert details["finish_reason"] == "length" and 1 <= details["generated_tokens"] < 2000
