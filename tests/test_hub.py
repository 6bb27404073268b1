"""Loading by Hub id from the Hugging Face cache, offline or with the Hub unreachable: a fake cache laid out
as huggingface_hub writes it, and a loopback port standing in for a Hub that cannot be reached."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import PROMPTS, neoj_logits

import neoj

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """Lays `source`'s files out as a Hub cache entry (blobs, snapshot symlinks, refs/main); returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """Returns an empty Hub cache directory that huggingface_hub uses, with the Hub switched off."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both at import time; patch the values it actually consults.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_load_by_hub_id_from_the_cache(neo, offline_cache, tokenizer):
    snapshot = fake_cache(offline_cache, "tiny-org/tiny-neo", neo.path)
    assert (snapshot / "model.safetensors").is_symlink()
    lm = neoj.load("tiny-org/tiny-neo", dtype="float32", device="cpu")
    assert lm.name == "tiny-org/tiny-neo"
    assert lm.config.model_type == "gpt_neo"
    ids = tokenizer.encode(PROMPTS[0])
    assert torch.equal(neoj_logits(lm, ids), neoj_logits(neo.lm, ids))


def test_load_by_hub_id_at_a_commit(gptj, offline_cache, tokenizer):
    fake_cache(offline_cache, "tiny-org/tiny-j", gptj.path)
    lm = neoj.load("tiny-org/tiny-j", dtype="float32", device="cpu", revision=COMMIT)
    ids = tokenizer.encode(PROMPTS[1])
    assert torch.equal(neoj_logits(lm, ids), neoj_logits(gptj.lm, ids))


def test_hub_id_not_in_the_cache_offline(neo, offline_cache):
    fake_cache(offline_cache, "tiny-org/tiny-neo", neo.path)
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load("tiny-org/not-cached", dtype="float32", device="cpu")
    message = str(info.value)
    assert "'tiny-org/not-cached'" in message
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message


def test_cli_download_and_info_use_the_cache(neo, offline_cache, capsys):
    from neoj.cli import main

    snapshot = fake_cache(offline_cache, "tiny-org/tiny-neo", neo.path)
    assert main(["download", "tiny-org/tiny-neo"]) == 0
    assert capsys.readouterr().out.strip() == str(snapshot)
    assert main(["info", "tiny-org/tiny-neo"]) == 0  # reads config.json only, from the cache
    assert "gpt_neo" in capsys.readouterr().out
    assert main(["download", "tiny-org/missing"]) == 1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# No network: one attempt, one line, and the cache still serves


class CountingListener:
    """A loopback TCP port that reads each HTTP request line, then closes the connection without answering.

    To huggingface_hub it is a Hub that cannot be reached (the server disconnects without a response).
    `requests` lists the paths asked for, in order.
    """

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model_requests(self) -> list[str]:
        """Returns the paths asked for, but huggingface_hub's own once-a-day fetch of its agent registry."""
        return [r.split("?")[0] for r in self.requests if r.split("?")[0] != "/api/agent-harnesses"]

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:  # timeout: look at the stop flag again
                continue
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    line = ""
                parts = line.split()
                self.requests.append(parts[1] if len(parts) > 1 else "")

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


MODEL_INFO = "/api/models/someorg/somemodel"


@pytest.fixture
def dead_hub(tmp_path, monkeypatch):
    """Returns (listener, cache dir): the Hub endpoint is a port that drops every connection, HF_HUB_OFFLINE unset."""
    listener = CountingListener()
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", listener.endpoint)
    yield listener, cache
    listener.close()


def test_unreachable_hub_fails_after_one_attempt(dead_hub):
    listener, _ = dead_hub
    with pytest.raises(neoj.CheckpointError) as info:
        neoj.load("someorg/somemodel", dtype="float32", device="cpu")
    message = str(info.value)
    assert message.startswith(f"cannot reach the Hugging Face Hub at {listener.endpoint}")
    assert "'someorg/somemodel' is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert listener.model_requests() == [MODEL_INFO]  # one attempt, no retries


def test_unreachable_hub_still_loads_a_cached_model(neo, dead_hub, tokenizer, caplog):
    listener, cache = dead_hub
    fake_cache(cache, "tiny-org/tiny-neo", neo.path)
    with caplog.at_level("WARNING", logger="neoj"):
        lm = neoj.load("tiny-org/tiny-neo", dtype="float32", device="cpu")
    ids = tokenizer.encode(PROMPTS[0])
    assert torch.equal(neoj_logits(lm, ids), neoj_logits(neo.lm, ids))
    assert listener.model_requests() == ["/api/models/tiny-org/tiny-neo"]
    assert any("using the cached copy of tiny-org/tiny-neo" in r.getMessage() for r in caplog.records)


def test_info_on_an_unreachable_hub_is_one_line(dead_hub, capsys):
    from neoj.cli import main

    listener, _ = dead_hub
    assert main(["info", "someorg/somemodel"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neoj: error: cannot reach the Hugging Face Hub")
    assert listener.model_requests() == [MODEL_INFO]


def _neoj_env(**extra) -> dict:
    """Returns the environment for a `neoj` subprocess: no proxies, no HF_HUB_OFFLINE, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env.update(NO_PROXY="127.0.0.1,localhost", **extra)
    return env


def test_cli_generate_with_no_network_is_one_line_and_one_attempt(tmp_path):
    listener = CountingListener()
    try:
        proc = subprocess.run([sys.executable, "-m", "neoj", "generate", "-m", "someorg/somemodel", "x"],
                              env=_neoj_env(HF_ENDPOINT=listener.endpoint, HF_HUB_CACHE=str(tmp_path / "hub")),
                              capture_output=True, text=True, timeout=120)
    finally:
        listener.close()
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("neoj: error: cannot reach the Hugging Face Hub at http://127.0.0.1:")
    assert "'someorg/somemodel'" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    # One request for the model; huggingface_hub may also ask once for its own agent registry.
    assert listener.model_requests() == [MODEL_INFO]
    assert set(listener.requests) <= {MODEL_INFO, "/api/agent-harnesses"}, listener.requests


def test_cli_generate_against_a_closed_port(tmp_path):
    # A bound port nobody listens on: the connection is refused outright.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "neoj", "generate", "-m", "someorg/somemodel", "x"],
                              env=_neoj_env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "h")),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"neoj: error: cannot reach the Hugging Face Hub at http://127.0.0.1:{port}")
