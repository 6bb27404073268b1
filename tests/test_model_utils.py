"""neoj.model_utils: fitting prompts to the context, padding rows, chunked log-probabilities, mean-pooled embeddings."""

import pytest
import torch

from neoj.config import from_hf_dict
from neoj.errors import ContextLengthError
from neoj.model_utils import embed_rows, fit_prompt, left_pad, mean_pooled, right_pad, token_logprobs
from neoj.weights import random_model

TINY = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 64, "hidden_size": 32,
        "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}
ROWS = [[5, 6, 7, 8, 9], [11], [300, 400, 500]]


@pytest.fixture(scope="module")
def model():
    return random_model(from_hf_dict(TINY), seed=3).eval()


def test_fit_prompt_keeps_a_prompt_that_fits():
    ids = list(range(10))
    assert fit_prompt(ids, 6, 16, truncate=False) == ids
    assert fit_prompt(ids, 6, 16, truncate=True) == ids


def test_fit_prompt_refuses_a_prompt_too_long_naming_counts_and_limit():
    with pytest.raises(ContextLengthError) as info:
        fit_prompt(list(range(12)), 6, 16, truncate=False)
    exc = info.value
    assert (exc.prompt_tokens, exc.limit) == (12, 16)
    assert "12 tokens" in str(exc) and "6 new tokens" in str(exc) and "16 tokens" in str(exc)
    assert "shorten" in str(exc) and "truncat" in str(exc)


def test_fit_prompt_truncates_to_the_last_tokens():
    ids = list(range(12))
    kept = fit_prompt(ids, 6, 16, truncate=True)
    assert kept == ids[2:] and len(kept) + 6 == 16
    assert fit_prompt(ids, 15, 16, truncate=True) == [11]


@pytest.mark.parametrize("truncate", [False, True])
def test_fit_prompt_refuses_max_new_tokens_that_leave_no_room(truncate):
    with pytest.raises(ContextLengthError, match="max_new_tokens=16") as info:
        fit_prompt([1, 2], 16, 16, truncate=truncate)
    assert (info.value.prompt_tokens, info.value.limit) == (2, 16)


def test_left_pad_right_aligns_rows():
    ids, valid = left_pad(ROWS, pad_id=0, device="cpu")
    assert ids.shape == valid.shape == (3, 5) and ids.dtype == torch.long and valid.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 0, 11], [0, 0, 300, 400, 500]]
    assert valid.tolist() == [[True] * 5, [False] * 4 + [True], [False, False, True, True, True]]


def test_right_pad_left_aligns_rows():
    ids = right_pad(ROWS, pad_id=7, device="cpu")
    assert ids.shape == (3, 5) and ids.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7, 8, 9], [11, 7, 7, 7, 7], [300, 400, 500, 7, 7]]


@pytest.mark.parametrize("chunk", [256, 3])
def test_token_logprobs_equal_log_softmax_of_the_full_logits(model, chunk):
    with torch.no_grad():
        hidden = model(torch.tensor([ROWS[0]]))[0]  # (5, C)
        targets = torch.tensor([1, 2, 50256, 17, 4])
        full = torch.log_softmax(model.logits(hidden).float(), dim=-1)
        values, tops = token_logprobs(model, hidden, targets, chunk=chunk)
    assert tops is None and len(values) == 5
    assert values == pytest.approx(full[torch.arange(5), targets].tolist(), abs=1e-5)


def test_token_logprobs_top_n(model):
    with torch.no_grad():
        hidden = model(torch.tensor([ROWS[2]]))[0]
        full = torch.log_softmax(model.logits(hidden).float(), dim=-1)
        _, tops = token_logprobs(model, hidden, torch.tensor([0, 0, 0]), top_n=4, chunk=2)
    assert len(tops) == 3
    for row, top in zip(full, tops):
        best = torch.topk(row, 4)
        assert list(top) == best.indices.tolist()
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-6)


def test_mean_pooled_averages_each_rows_own_positions_in_fp32():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.bfloat16).reshape(2, 4, 3)
    pooled = mean_pooled(hidden, [2, 4])
    assert all(v.dtype == torch.float32 and v.shape == (3,) for v in pooled)
    assert pooled[0].tolist() == hidden[0, :2].float().mean(dim=0).tolist()
    assert pooled[1].tolist() == hidden[1].float().mean(dim=0).tolist()


def test_embed_rows_equal_each_rows_own_mean_hidden_state(model):
    got = embed_rows(model, ROWS, pad_id=50256)
    assert len(got) == len(ROWS) and all(v.device.type == "cpu" and v.shape == (32,) for v in got)
    with torch.no_grad():
        alone = [model(torch.tensor([r]))[0].float().mean(dim=0) for r in ROWS]
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, atol=1e-5, rtol=1e-5)
    # Padding after a row's end never reaches its tokens: another pad id gives the same vectors.
    for g, o in zip(got, embed_rows(model, ROWS, pad_id=0)):
        torch.testing.assert_close(g, o, atol=1e-6, rtol=1e-6)
