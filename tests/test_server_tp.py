"""`neoj serve --tp 2` over 2 gloo processes: rank 0 serves HTTP, both ranks decode; it answers what one process
answers, and a rank that dies stops the server with an error instead of a hang.

Real clients on 127.0.0.1 (httpx), a real `torchrun ... -m neoj serve --tp 2` and, for the failure cases, the two
ranks started by hand (as on two machines, with no torchrun watching both), so neoj's own detection is tested.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from neoj.server import run_in_thread

pytestmark = pytest.mark.usefixtures("one_thread")

BODIES = [
    ("/v1/completions", {"prompt": "The quick brown fox jumps over the lazy dog, and then", "max_tokens": 12,
                         "temperature": 0}),
    ("/v1/completions", {"prompt": ["def f(x):\n    return", "Once upon a time"], "max_tokens": 9,
                         "temperature": 0.8, "seed": 11}),
    ("/v1/completions", {"prompt": "Numbers: 1, 2, 3,", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say something long"}], "max_tokens": 10,
                              "temperature": 0}),
    ("/generate", {"inputs": "In 1998, the cafe", "parameters": {"max_new_tokens": 8, "details": True}}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not come up")


def answers(url: str, model: str) -> tuple[list, list[float]]:
    """Returns what the server answers to BODIES that depends on the model (not on the clock or ids): the texts,
    tokens and finish reasons, and apart from them every log-probability (equal only to rounding over TP)."""
    out, logprobs = [], []
    for path, body in BODIES:
        body = {**body, "model": model} if path.startswith("/v1") else body
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()
        if path == "/generate":
            tokens = data["details"]["tokens"]
            out.append([data["generated_text"], [t["id"] for t in tokens]])
            logprobs += [t["logprob"] for t in tokens]
            continue
        for c in data["choices"]:
            out.append([c.get("text") or c.get("message", {}).get("content"), c["finish_reason"]])
            if c.get("logprobs"):
                out.append([c["logprobs"]["tokens"], [sorted(top) for top in c["logprobs"]["top_logprobs"]]])
                logprobs += c["logprobs"]["token_logprobs"]
                logprobs += [v for top in c["logprobs"]["top_logprobs"] for _, v in sorted(top.items())]
    return out, logprobs


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "NEOJ_COLLECTIVE_TIMEOUT": "20", **extra}


def serve_cmd(model_dir, port: int) -> list[str]:
    return ["-m", "neoj", "--threads", "1", "serve", "--tp", "2", "--model", str(model_dir), "--port", str(port),
            "--dtype", "float32", "--device", "cpu"]


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_tp_server_answers_what_one_process_answers(zoo, name):
    tiny = zoo[name]
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *serve_cmd(tiny.path, port)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        over_tp, tp_logprobs = answers(url, model)
        assert httpx.post(url + "/v1/embeddings", json={"model": model, "input": "x"}, timeout=30).status_code == 501
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    with run_in_thread(tiny.lm, model_id=model) as server:
        alone, logprobs = answers(server.url, model)
    assert over_tp == alone
    assert tp_logprobs == pytest.approx(logprobs, abs=1e-4)


def start_by_hand(model_dir, port: int) -> list[subprocess.Popen]:
    """Starts the two ranks as separate processes (no torchrun watching them): rank 0 serves on `port`."""
    rendezvous = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    return [subprocess.Popen([sys.executable, *serve_cmd(model_dir, port)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env(RANK=str(r), LOCAL_RANK=str(r), **rendezvous))
            for r in (0, 1)]


@pytest.mark.parametrize("lost", [1, 0])
def test_a_rank_that_dies_stops_the_others_with_an_error(zoo, lost):
    port = free_port()
    ranks = start_by_hand(zoo["neo"].path, port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", ranks[0])
        ranks[lost].kill()
        survivor = ranks[1 - lost]
        _, err = survivor.communicate(timeout=60)  # the heartbeat finds the lost rank within seconds
        assert survivor.returncode == 1, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("neoj: error:") and "lost the other ranks" in last, err[-2000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_a_rank_that_hangs_times_out(zoo):
    """A rank that stops answering (SIGSTOP) is not waited for forever: the collective times out
    (NEOJ_COLLECTIVE_TIMEOUT, 20 s here) and the server stops with an error."""
    port = free_port()
    ranks = start_by_hand(zoo["neo"].path, port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", ranks[0])
        ranks[1].send_signal(signal.SIGSTOP)
        _, err = ranks[0].communicate(timeout=90)
        assert ranks[0].returncode == 1, err[-2000:]
        assert "lost the other ranks" in err.strip().splitlines()[-1], err[-2000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.communicate()
