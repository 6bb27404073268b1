"""/metrics on a real server: the latency histograms and queue gauges that dashboards made for vLLM and TGI read,
recorded by the engine (time to first token, inter-token latency, end-to-end and queue time)."""

import re
import threading
import time

import httpx
import pytest

from neoj.server.metrics import Metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+\-]+|\+Inf|NaN)$')
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
              "vllm:request_queue_time_seconds")


def scrape(client: httpx.Client) -> dict[str, float]:
    """Returns every sample of /metrics, keyed by name and labels as written, less the model_name label (the
    server puts its model id on the vllm: series, as vLLM does); checks the text format."""
    text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels = re.sub(r'model_name="[^"]*",?', "", match.group(2) or "")
        samples[match.group(1) + ("" if labels == "{}" else labels)] = float(match.group(3))
    return samples


def check_histogram(samples: dict[str, float], name: str) -> int:
    """Checks that the buckets are cumulative and end with +Inf = _count; returns _count."""
    buckets = [(k, v) for k, v in samples.items() if k.startswith(name + "_bucket{")]
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0].endswith('le="+Inf"}')
    assert values[-1] == samples[name + "_count"]
    assert samples[name + "_sum"] >= 0
    return int(samples[name + "_count"])


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Polls until predicate() holds (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


@pytest.fixture(scope="module")
def busy_server(serve_tiny):
    return serve_tiny(n_positions=2048, layers=2, max_batch=1, max_queue=8)


def test_histogram_counts_equal_requests_and_tokens(serve_tiny):
    """Sequential and concurrent requests (more than the batch's rows, so some wait): one first-token, e2e and
    queue observation per request, and one inter-token observation per token after each sequence's first."""
    server = serve_tiny(n_positions=256, layers=2, max_batch=3, max_queue=16)
    lengths = [1, 2, 5, 9, 3, 12, 7, 4, 6]

    def complete(client, i, n):
        body = {"prompt": f"request {i} " * (1 + i % 4), "max_tokens": n, "temperature": 0, "ignore_eos": True}
        return client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]

    with httpx.Client(base_url=server.url, timeout=120) as client:
        tokens = [complete(client, i, n) for i, n in enumerate(lengths[:3])]
        results = [0] * (len(lengths) - 3)
        threads = [threading.Thread(target=lambda j=j, n=n: results.__setitem__(j, complete(client, j + 3, n)))
                   for j, n in enumerate(lengths[3:])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        tokens += results
        samples = scrape(client)
    assert tokens == lengths
    n, total = len(lengths), sum(lengths)
    counts = {name: check_histogram(samples, name) for name in HISTOGRAMS}
    assert counts == {"vllm:time_to_first_token_seconds": n, "vllm:inter_token_latency_seconds": total - n,
                      "vllm:time_per_output_token_seconds": total - n, "vllm:e2e_request_latency_seconds": n,
                      "vllm:request_queue_time_seconds": n}
    assert samples["vllm:generation_tokens_total"] == samples["neoj_generated_tokens_total"] == total
    assert samples["vllm:prompt_tokens_total"] == samples["neoj_prompt_tokens_total"] > 0
    assert samples["vllm:num_requests_waiting"] == samples["vllm:num_requests_running"] == 0
    # Each request's end-to-end time holds its first token's and its queue time.
    assert samples["vllm:e2e_request_latency_seconds_sum"] >= samples["vllm:time_to_first_token_seconds_sum"]
    assert samples["vllm:time_to_first_token_seconds_sum"] >= samples["vllm:request_queue_time_seconds_sum"]
    # The server's own per-route histograms are still there.
    assert samples['neoj_time_to_first_token_seconds_count{route="/v1/completions"}'] == n


def test_gauges_show_a_busy_queue(busy_server):
    engine = busy_server.app.state.neoj.engine
    with httpx.Client(base_url=busy_server.url, timeout=120) as client:
        busy = {"prompt": "a", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=busy) as running:
            lines = running.iter_lines()  # kept referenced: a collected iterator closes the connection
            next(lines)  # its first token: it holds the only row
            waiting = [threading.Thread(target=lambda i=i: client.post("/v1/completions", json={
                "prompt": f"w{i}", "max_tokens": 1})) for i in range(3)]
            for t in waiting:
                t.start()
            assert wait_for(lambda: engine.stats.waiting == 3)
            samples = scrape(client)
            assert samples["vllm:num_requests_waiting"] == samples["tgi_queue_size"] == 3
            assert samples["neoj_queue_depth"] == 3
            assert samples["vllm:num_requests_running"] == samples["tgi_batch_current_size"] == 1
        for t in waiting:  # the stream closed: its row freed, the waiting requests run
            t.join(120)
        assert wait_for(lambda: engine.stats.waiting == 0 and engine.stats.running == 0)
        samples = scrape(client)
    assert samples["vllm:num_requests_waiting"] == samples["vllm:num_requests_running"] == 0
    assert check_histogram(samples, "vllm:time_to_first_token_seconds") == 4
    assert check_histogram(samples, "vllm:request_queue_time_seconds") == 4
    # The waiting requests' queue time is part of their time to first token.
    assert samples["vllm:time_to_first_token_seconds_sum"] >= samples["vllm:request_queue_time_seconds_sum"] > 0


def test_the_model_name_label_when_given(busy_server):
    text = Metrics(model_name="tiny").render(busy_server.app.state.neoj.engine)
    assert 'vllm:num_requests_running{model_name="tiny"} ' in text
    assert 'vllm:e2e_request_latency_seconds_bucket{model_name="tiny",le="0.3"} ' in text
    assert 'vllm:e2e_request_latency_seconds_count{model_name="tiny"} ' in text
    assert "tgi_queue_size " in text  # TGI's series have no labels
    plain = Metrics().render(busy_server.app.state.neoj.engine)
    assert "vllm:num_requests_running " in plain and "model_name" not in plain
    served = httpx.get(busy_server.url + "/metrics").text
    model_id = busy_server.app.state.neoj.model_id
    assert f'vllm:num_requests_running{{model_name="{model_id}"}} ' in served  # the server labels its model id
