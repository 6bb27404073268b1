#!/usr/bin/env python
"""Server benchmark: `neoj serve` under 1, 8 and 32 concurrent streaming clients, against `neoj generate`.

The server runs in its own process (`python -m neoj serve --model random:gpt-neo-125m`, random weights of
the GPT-Neo-125M shape) on a loopback port. Each client streams /v1/completions (greedy, ignore_eos, so
every request makes exactly --new-tokens tokens) back to back, --requests-per-client times. The levels
run --rounds times, interleaved (1, 8, 32, 1, 8, 32, ...), so a slow moment of the machine hits one run
rather than one level. Per level it reports aggregate generated tokens/s (all tokens / wall time of a
run; the median and range over the runs), per-request latency and time to first token (p50, p99 over all
runs' requests), and the speed-up over one client. Every level is warmed up first with as many clients
(short requests), so one-time costs such as oneDNN's kernels for each batch size stay out of the numbers.

Against `neoj generate`: a second process holds the model as `neoj generate` does and streams the same
request through LanguageModel.stream, writing each piece out as the command does. Its requests alternate
with single requests to the server (server and library never run at once, the order flips every round,
the model is warm in both), and the medians of the two end-to-end times give the ratio.

It writes (or replaces) the `bench_server` section of BENCHMARKS.md. Progress goes to stderr.

    python bench/bench_server.py            # full run (~7 min on 2 cores), on an otherwise idle machine
    python bench/bench_server.py --quick    # smoke test (tiny counts), prints the section instead
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_server`
from report import REPO, git_rev, loadavg, logger, package_version, section_markers, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_server")
PROMPT = "The history of the printing press begins in the fifteenth century, when"

# What `neoj generate --temperature 0 --ignore-eos` does per request, timed on each line read from stdin.
GENERATE_WORKER = r"""
import json, os, sys, time, torch, neoj
model, new_tokens, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
lm = neoj.load(model, dtype="float32", device="cpu")
opts = dict(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False)
out = open(os.devnull, "w")
for _ in lm.stream(prompt, **dict(opts, max_new_tokens=4)):  # warm-up
    pass
print("READY", flush=True)
for _ in sys.stdin:
    start = time.perf_counter(); first = None
    for piece in lm.stream(prompt, **opts):
        first = first or time.perf_counter()
        out.write(piece)
        out.flush()
    end = time.perf_counter()
    print("RESULT " + json.dumps({"latency": end - start, "ttft": first - start}), flush=True)
"""


log = logger("bench_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Returns the q-th percentile (0-100) by linear interpolation."""
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = (len(values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class Server:
    """`python -m neoj serve` in a child process, on a free loopback port."""

    def __init__(self, model: str, threads: int, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.cmd = [sys.executable, "-m", "neoj", "serve", "--model", model, "--dtype", "float32", "--device", "cpu",
                    "--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", "256", "--model-id", "bench"]
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, new_tokens: int) -> dict:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            elif first is None and msg["choices"] and msg["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def run_level(url: str, clients: int, per_client: int, new_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            return [await one_request(client, new_tokens) for _ in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    return {"clients": clients, "results": results, "wall": wall,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall}


def summarize(runs: list[dict]) -> dict:
    """Returns one level over its runs: median and range of the aggregate tokens/s, latencies pooled."""
    results = [r for run in runs for r in run["results"]]
    rates = [run["tokens_per_s"] for run in runs]
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {"clients": runs[0]["clients"], "runs": len(runs), "requests": len(results),
            "tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "p50": percentile(lat, 50), "p99": percentile(lat, 99),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99)}


class Generate:
    """The library's single stream (what `neoj generate` runs) in its own process, one request per call."""

    def __init__(self, model: str, new_tokens: int, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, "-c", GENERATE_WORKER, model, str(new_tokens), str(threads),
                                      PROMPT], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"the generate worker failed to start (exit code {self.proc.wait()})")

    def request(self) -> dict:
        """Returns {"latency", "ttft"} of one streamed request."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("RESULT "):
            raise RuntimeError(f"the generate worker failed (exit code {self.proc.wait()})")
        return json.loads(line[7:])

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def paired(url: str, gen: Generate, new_tokens: int, rounds: int) -> dict:
    """Returns medians of alternating single requests to the library and the server, and their ratio."""
    lib, srv = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, 4)  # the connection is open, as for a client's later requests
        for r in range(rounds):
            for side in ("lib", "server") if r % 2 == 0 else ("server", "lib"):
                if side == "lib":
                    lib.append(gen.request())
                else:
                    srv.append(await one_request(client, new_tokens))
    lib_lat = statistics.median(x["latency"] for x in lib)
    srv_lat = statistics.median(x["latency"] for x in srv)
    return {"rounds": rounds, "lib_tokens_per_s": new_tokens / lib_lat, "server_tokens_per_s": new_tokens / srv_lat,
            "lib_ttft": statistics.median(x["ttft"] for x in lib),
            "server_ttft": statistics.median(x["ttft"] for x in srv), "ratio": lib_lat / srv_lat}


def section(args, levels: list[dict], pair: dict, load: str) -> str:
    base = levels[0]["tokens_per_s"] if levels and levels[0]["clients"] == 1 else None
    lines = [SECTION_BEGIN, "## Server: continuous batching under concurrent clients (CPU)", "",
             f"`neoj serve --model {args.model}` (random weights), float32, {args.threads} threads, "
             f"max batch {args.max_batch}. Each client streams `/v1/completions` back to back "
             f"({args.requests_per_client} request{'s' if args.requests_per_client != 1 else ''} per client): "
             f"a {len(PROMPT.split())}-word prompt, "
             f"{args.new_tokens} new tokens (greedy, ignore_eos), over loopback HTTP with the clients in another "
             f"process on the same machine. The levels ran {args.rounds} times, interleaved. Aggregate tokens/s is "
             "all generated tokens over a run's wall time (median of the runs, and their range); latency is per "
             "request, from sending it to its last token, over all runs.", "",
             "| clients | requests | aggregate tokens/s | runs | vs 1 client | latency p50 | latency p99 | "
             "first token p50 | first token p99 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        speed = f"{lv['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['tokens_per_s']:.1f} | "
                     f"{lv['min']:.1f}-{lv['max']:.1f} | {speed} | {lv['p50']:.2f} s | {lv['p99']:.2f} s | "
                     f"{lv['ttft_p50']:.2f} s | {lv['ttft_p99']:.2f} s |")
    lines.append("")
    lines.append(f"One client against `neoj generate` ({pair['rounds']} requests each, alternating, medians, end to "
                 f"end): the server streams {pair['server_tokens_per_s']:.1f} tokens/s (first token "
                 f"{pair['server_ttft']:.3f} s), the library's stream as `neoj generate` runs it "
                 f"{pair['lib_tokens_per_s']:.1f} tokens/s (first token {pair['lib_ttft']:.3f} s): "
                 f"**{pair['ratio']:.2f}x** (target: at least 1x).")
    one = next((lv for lv in levels if lv["clients"] == 1), None)
    eight = next((lv for lv in levels if lv["clients"] == 8), None)
    if one and eight:
        lines.append(f"Eight clients: **{eight['tokens_per_s'] / one['tokens_per_s']:.2f}x** the single-client "
                     "aggregate throughput (target: at least 4x).")
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; load average at "
              f"start {load}. Date: {_dt.date.today().isoformat()}; torch {package_version('torch')}, neoj git "
              f"{git_rev('+local changes', paths=('src', 'bench'), untracked=False)}.",
              f"Command: `{' '.join(['python', 'bench/bench_server.py'] + [shlex.quote(a) for a in sys.argv[1:]])}`",
              SECTION_END, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt-neo-125m", help="what the server loads (default random:gpt-neo-125m)")
    p.add_argument("--clients", default=None, help="comma list of concurrency levels (default 1,8,32)")
    p.add_argument("--requests-per-client", type=int, default=None, help="requests each client sends (default 3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 128; --quick 16)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads in the server")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="runs of every level, interleaved (default 3; --quick 1)")
    p.add_argument("--pairs", type=int, default=None, help="requests each to the library and the server in "
                   "the single-stream comparison (default 6; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 tokens, 1 request per client, stdout")
    p.add_argument("--out", default=None, help="file to write the section to (default BENCHMARKS.md; --quick: -)")
    args = p.parse_args(argv)
    q = args.quick
    args.clients = args.clients or ("1,8" if q else "1,8,32")
    args.requests_per_client = args.requests_per_client or (1 if q else 3)
    args.new_tokens = args.new_tokens or (16 if q else 128)
    args.pairs = args.pairs or (2 if q else 6)
    args.rounds = args.rounds or (1 if q else 3)
    args.out = args.out or ("-" if q else str(REPO / "BENCHMARKS.md"))
    load = loadavg("n/a")

    levels_wanted = [int(c) for c in args.clients.split(",")]
    server = Server(args.model, args.threads, args.max_batch)
    gen = Generate(args.model, args.new_tokens, args.threads)
    try:
        log("starting the server and the library's worker")
        server.wait_ready()
        gen.wait_ready()
        for clients in sorted(set(levels_wanted)):  # warm-up: kernels for every batch size on the way
            asyncio.run(run_level(server.url, clients, 1, 8))
        runs: dict[int, list[dict]] = {c: [] for c in levels_wanted}
        for r in range(args.rounds):
            for clients in levels_wanted:
                log(f"run {r + 1}/{args.rounds}: {clients} client(s) x {args.requests_per_client} request(s)")
                run = asyncio.run(run_level(server.url, clients, args.requests_per_client, args.new_tokens))
                log(f"  {run['tokens_per_s']:.1f} tokens/s")
                runs[clients].append(run)
        levels = [summarize(runs[c]) for c in dict.fromkeys(levels_wanted)]
        log(f"one client against the library's stream, {args.pairs} requests each")
        pair = asyncio.run(paired(server.url, gen, args.new_tokens, args.pairs))
        log(f"  server {pair['server_tokens_per_s']:.1f} tokens/s, library {pair['lib_tokens_per_s']:.1f} tokens/s")
    finally:
        gen.stop()
        server.stop()
    write_section(args.out, section(args, levels, pair, load), SECTION_BEGIN, SECTION_END, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
