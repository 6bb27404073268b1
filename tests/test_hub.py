"""Loading by Hub id from the Hugging Face cache, offline: a fake cache laid out as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import os
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
