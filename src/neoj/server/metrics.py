"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

neoj's own series (`neoj_` prefix, Prometheus' naming conventions):
    neoj_http_requests_total{route,status}        counter    HTTP requests answered
    neoj_request_duration_seconds{route}          histogram  submit -> last token, seen by the server
    neoj_time_to_first_token_seconds{route}       histogram  submit -> first token, seen by the server
    neoj_queue_rejected_total                     counter    requests answered 503 (queue full)
    neoj_queue_depth, neoj_running_sequences      gauges     requests waiting, sequences decoding
    neoj_max_batch, neoj_max_queue                gauges     the engine's limits
    neoj_requests_total, neoj_prompt_tokens_total, neoj_generated_tokens_total, neoj_decode_steps_total,
    neoj_sequences_finished_total{reason}         counters
    neoj_prefix_cache_used_bytes, neoj_prefix_cache_max_bytes   gauges  the prefix cache's blocks and limit (0: off)
    neoj_prefix_cache_hit_rate                    gauge      prompt tokens found / looked up, since start
    neoj_spec_decode_acceptance_rate              gauge      speculative guesses accepted / verified, since start

The names dashboards and autoscalers made for other servers query, with those servers' meanings, read from the
engine (EngineStats and its latency histograms, recorded by the model thread):
    vLLM (docs/design/metrics.md, vllm/v1/metrics/loggers.py; its bucket bounds too):
    vllm:time_to_first_token_seconds     histogram  submit -> first token, per request (queueing included)
    vllm:inter_token_latency_seconds     histogram  between consecutive tokens of a sequence
    vllm:time_per_output_token_seconds   histogram  the same observations under vLLM's older name (before 0.11)
    vllm:e2e_request_latency_seconds     histogram  submit -> last token, per request that produced a token
    vllm:request_queue_time_seconds      histogram  submit -> leaving the queue for a batch row, per request
    vllm:num_requests_waiting            gauge      requests waiting for a row
    vllm:num_requests_running            gauge      sequences in the running batch
    vllm:prompt_tokens_total, vllm:generation_tokens_total   counters
    vllm:prefix_cache_queries_total      counter    prompt tokens looked up in the prefix cache
    vllm:prefix_cache_hits_total         counter    of those, found (hit rate: rate(hits) / rate(queries))
    vllm:spec_decode_num_drafts_total    counter    decode steps that verified guesses (vLLM counts one per
                                                    request and step: with one row per step they agree)
    vllm:spec_decode_num_draft_tokens_total, vllm:spec_decode_num_accepted_tokens_total   counters
                                                    guesses verified, and accepted (acceptance rate: their ratio)
    TGI (text-generation-inference's router): tgi_queue_size (gauge, requests waiting) and
    tgi_batch_current_size (gauge, sequences in the running batch): the two its autoscaling guides watch.
The `vllm:` names keep vLLM's colon, which Prometheus' conventions reserve for recording rules: a dashboard
finds a series only under its exact name. They carry vLLM's model_name label when Metrics is given one.
"""

from __future__ import annotations

import bisect
import threading

from ..engine import Engine
from ..engine.request import Timings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        """Adds `amount` to the series of these label values."""
        with self._lock:
            self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def render(self) -> list[str]:
        """Returns the exposition lines."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self.values.items())]
        if not self.values and not self.labels:
            out.append(f"{self.name} 0")
        return out


class Histogram:
    """Observations counted into cumulative buckets, per label set."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS):
        self.name, self.help, self.labels, self.buckets = name, help, labels, tuple(buckets)
        self.series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum, count]
        self._lock = threading.Lock()

    def observe(self, value: float, *label_values: str) -> None:
        """Records one observation."""
        with self._lock:
            s = self.series.setdefault(label_values, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                s[i] += 1
            s[-2] += value
            s[-1] += 1

    def render(self) -> list[str]:
        """Returns the exposition lines (cumulative buckets, +Inf, _sum, _count)."""
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, s in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.buckets, s):
                cumulative += n
                out.append(f"{self.name}_bucket{_labels(self.labels + ('le',), key + (f'{bound:g}',))} {cumulative}")
            out.append(f"{self.name}_bucket{_labels(self.labels + ('le',), key + ('+Inf',))} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {s[-2]:g}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {s[-1]}")
        return out


class Metrics:
    """The server's metrics: HTTP requests and latencies here, token and queue figures read from the engine."""

    def __init__(self, model_name: str | None = None):
        self.model_name = model_name  # vLLM's model_name label on the vllm: series, when given
        self.requests = Counter("neoj_http_requests_total", "HTTP requests answered, by route and status code.",
                                ("route", "status"))
        self.latency = Histogram("neoj_request_duration_seconds",
                                 "Time from submitting a generation to its last token, by route.", ("route",))
        self.ttft = Histogram("neoj_time_to_first_token_seconds",
                              "Time from submitting a generation to its first token (queueing included), by route.",
                              ("route",))
        self.rejected = Counter("neoj_queue_rejected_total", "Requests answered 503 because the queue was full.")

    def render(self, engine: Engine) -> str:
        """Returns the whole exposition text."""
        s = engine.stats
        lines = self.requests.render() + self.latency.render() + self.ttft.render() + self.rejected.render()

        def metric(name, kind, help, value, labels=""):
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

        metric("neoj_queue_depth", "gauge", "Requests waiting for a batch slot.", s.waiting)
        metric("neoj_running_sequences", "gauge", "Sequences in the running batch.", s.running)
        metric("neoj_max_batch", "gauge", "Sequences the running batch holds at most.", engine.max_batch)
        metric("neoj_max_queue", "gauge", "Requests that may wait before new ones get 503.", engine.max_queue)
        metric("neoj_requests_total", "counter", "Generation requests accepted by the engine.", s.requests)
        metric("neoj_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s.prompt_tokens)
        metric("neoj_generated_tokens_total", "counter", "Tokens generated.", s.generated_tokens)
        metric("neoj_decode_steps_total", "counter", "Batched decode steps run.", s.steps)
        lines += ["# HELP neoj_sequences_finished_total Sequences finished, by reason.",
                  "# TYPE neoj_sequences_finished_total counter"]
        for reason in ("eos", "stop", "length", "time", "cancelled", "error"):
            lines.append(f'neoj_sequences_finished_total{{reason="{reason}"}} {s.finished.get(reason, 0)}')
        lines += self._caching(engine)
        lines += self._compatible(engine)
        return "\n".join(lines) + "\n"

    def _caching(self, engine: Engine) -> list[str]:
        """Returns neoj's prefix-cache and speculative-decoding gauges, read from the engine."""
        s, cache = engine.stats, engine.prefix_cache
        spec_rate = s.spec_accepted_tokens / s.spec_drafted_tokens if s.spec_drafted_tokens else 0.0
        lines = []
        for name, help, value in [
            ("neoj_prefix_cache_used_bytes", "Bytes the prefix cache's stored blocks hold.",
             cache.used_bytes if cache is not None else 0),
            ("neoj_prefix_cache_max_bytes", "Bytes the prefix cache may hold (0: prefix caching off).",
             cache.max_bytes if cache is not None else 0),
            ("neoj_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up.",
             s.prefix_hit_tokens / s.prefix_queried_tokens if s.prefix_queried_tokens else 0.0),
            ("neoj_spec_decode_acceptance_rate", "Speculative tokens accepted / speculative tokens verified.",
             spec_rate),
        ]:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        return lines

    def _compatible(self, engine: Engine) -> list[str]:
        """Returns the vLLM and TGI series (see the module's docstring), read from the engine."""
        s, lat = engine.stats, engine.stats.latency
        labels = _labels(("model_name",), (self.model_name,)) if self.model_name else ""
        lines = []
        for name, help, timings in [
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", lat.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", lat.itl),
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds (the same "
             "observations as vllm:inter_token_latency_seconds, under vLLM's older name).", lat.itl),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", lat.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", lat.queue),
        ]:
            lines += render_timings(name, help, timings, labels)
        for name, kind, help, value in [
            ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", s.waiting),
            ("vllm:num_requests_running", "gauge", "Number of sequences in the running batch.", s.running),
            ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", s.prompt_tokens),
            ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", s.generated_tokens),
            ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried "
             "tokens.", s.prefix_queried_tokens),
            ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
             s.prefix_hit_tokens),
            ("vllm:spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts (decode steps that "
             "verified guesses).", s.spec_steps),
            ("vllm:spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens.", s.spec_drafted_tokens),
            ("vllm:spec_decode_num_accepted_tokens_total", "counter", "Number of accepted tokens.",
             s.spec_accepted_tokens),
            ("tgi_queue_size", "gauge", "Requests waiting in the queue.", s.waiting),
            ("tgi_batch_current_size", "gauge", "Sequences in the running batch.", s.running),
        ]:
            series = labels if name.startswith("vllm:") else ""
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{series} {value}"]
        return lines


def render_timings(name: str, help: str, timings: Timings, labels: str = "") -> list[str]:
    """Returns the exposition lines of an engine histogram: cumulative buckets, +Inf, _sum and _count, all from
    one snapshot, so that _count always equals the +Inf bucket."""
    counts, total = timings.snapshot()
    extra = labels[1:-1] + "," if labels else ""
    out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, n in zip(timings.bounds, counts):
        cumulative += n
        out.append(f'{name}_bucket{{{extra}le="{bound:g}"}} {cumulative}')
    cumulative += counts[-1]
    out.append(f'{name}_bucket{{{extra}le="+Inf"}} {cumulative}')
    out += [f"{name}_sum{labels} {total!r}", f"{name}_count{labels} {cumulative}"]
    return out
