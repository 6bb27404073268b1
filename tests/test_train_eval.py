"""Sliding-window perplexity: every token scored once, the HF recipe's numbers, and the JSON CLI."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from neoj.cli import main
from neoj.config import from_hf_dict
from neoj.train.evaluate import perplexity, windows
from neoj.weights import random_model, save_checkpoint

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 32, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}


@pytest.fixture(scope="module")
def model():
    return random_model(from_hf_dict(TINY), seed=2)


@pytest.mark.parametrize("n, length, stride", [(100, 32, 16), (100, 32, 32), (33, 32, 7), (5, 32, 16), (64, 16, 1)])
def test_windows_score_every_token_but_the_first_once(n, length, stride):
    scored = []
    for i, (begin, end, first) in enumerate(windows(n, length, stride)):
        assert end - begin <= length and begin < first <= end
        if i:  # after the first window, every scored token has at least length - stride tokens of context
            assert first - begin >= length - min(stride, length - 1)
        scored += range(first, end)
    assert scored == list(range(1, n))


def hf_recipe(model, ids, length, stride):
    """The transformers perplexity guide's loop, with labels = -100 for context tokens."""
    nll, count, prev_end = 0.0, 0, 0
    n = ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        trg = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-trg] = -100
        logits = model.logits(model(x))
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((labels[0, 1:] != -100).sum())
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("n, stride", [(152, 10), (160, 16), (20, 16)])
def test_matches_the_transformers_recipe(model, n, stride):
    ids = torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, count = hf_recipe(model, ids, 32, stride)
    got = perplexity(model, ids, max_length=32, stride=stride)
    assert got["tokens"] == count == n - 1
    assert got["perplexity"] == pytest.approx(ref, rel=1e-5)


class WrappedHead(torch.nn.Module):
    """An LM head that is not an nn.Linear, as a quantized one: perplexity takes its plain-logits path."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_a_head_without_a_weight_matrix_gives_the_same_perplexity(model):
    ids = torch.randint(0, 50257, (100,), generator=torch.Generator().manual_seed(1))
    weights = (torch.arange(100) % 3 != 0).float()  # some tokens excluded from scoring
    fused = perplexity(model, ids, weights, max_length=32, stride=12)
    plain_model = copy.deepcopy(model)
    plain_model.lm_head = WrappedHead(plain_model.lm_head)
    plain = perplexity(plain_model, ids, weights, max_length=32, stride=12)
    assert plain["tokens"] == fused["tokens"] == int(weights[1:].sum())
    assert plain["nll"] == pytest.approx(fused["nll"], rel=1e-5)
    ids = ids[:96]  # windows of 32 every 16 tokens end exactly at the end, as the recipe's do
    with torch.no_grad():
        ref, _ = hf_recipe(plain_model, ids, 32, 16)
    assert perplexity(plain_model, ids, max_length=32, stride=16)["perplexity"] == pytest.approx(ref, rel=1e-5)


def test_cli_prints_json(model, tmp_path, capsys):
    save_checkpoint(model, tmp_path / "m")
    data = tmp_path / "t.txt"
    data.write_text("The quick brown fox jumps over the lazy dog." * 20)
    assert main(["eval", "perplexity", "--model", str(tmp_path / "m"), "--data", str(data), "--stride", "8",
                 "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 200 and out["stride"] == 8 and out["max_length"] == 32 and out["perplexity"] > 1
