"""Sampling parameters at their extremes: every value GenerationParams accepts generates, and the library's
sampler (TokenSelector) and the engine's (RowSampler) pick the same tokens from the same distributions."""

import math
from types import SimpleNamespace

import pytest
import torch

import neoj
from neoj.config import from_hf_dict
from neoj.engine import RowSampler
from neoj.errors import GenerationError
from neoj.sampling import (FLOAT32_MAX, GREEDY_TEMPERATURE, GenerationParams, TokenSelector, penalize,
                           sampling_probs)

V, USABLE = 64, 56  # the last 8 rows are padding, masked to -inf as GPT-J's 50257..50399
TINY = [1e-45, 5e-324, 1e-300, 1e-30, 9.99e-6]

# Values validation accepts, alone and together; each must give a finite distribution and a usable token.
EXTREMES = [
    dict(temperature=1e-5), dict(temperature=1e-45), dict(temperature=5e-324), dict(temperature=1e300),
    dict(temperature=FLOAT32_MAX * 10), dict(temperature=1e300, top_k=2), dict(repetition_penalty=1e-300), dict(repetition_penalty=5e-324),
    dict(repetition_penalty=1e300), dict(top_p=5e-324), dict(top_p=1e-45), dict(top_k=10**30), dict(top_k=1),
    dict(temperature=1e-5, repetition_penalty=1e-300), dict(temperature=1e300, repetition_penalty=1e-300),
    dict(temperature=1e300, repetition_penalty=1e300, top_k=10**30, top_p=5e-324),
    dict(temperature=2.0, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-300),
]


def logits_and_seen(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g) * 5
    logits[:, USABLE:] = float("-inf")
    logits[:, 0] = 0.0  # an exact zero: 0 / penalty is NaN when the penalty reaches float32 as 0
    seen = torch.zeros(batch, V, dtype=torch.bool)
    seen[:, :6] = True
    return logits, seen


@pytest.mark.parametrize("t", TINY)
def test_temperatures_below_the_epsilon_are_greedy(t):
    assert GenerationParams(temperature=t).greedy
    assert GenerationParams(temperature=0).greedy
    assert not GenerationParams(temperature=GREEDY_TEMPERATURE).greedy
    assert not GenerationParams(temperature=1e300).greedy


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused_naming_the_field(name, value):
    with pytest.raises(GenerationError, match=name):
        GenerationParams(**{name: value}).validated()


def test_out_of_range_values_are_refused_naming_the_field():
    for name, value in [("temperature", -1e-300), ("top_p", 0.0), ("top_p", 1.0 + 1e-9), ("repetition_penalty", 0.0),
                        ("top_k", -1), ("presence_penalty", 2.5)]:
        with pytest.raises(GenerationError, match=name):
            GenerationParams(**{name: value}).validated()


def row_sampler_tokens(params: GenerationParams, logits: torch.Tensor, seen: torch.Tensor, seeds: list[int]):
    rows = [SimpleNamespace(params=params, seen=seen[i].clone() if params.repetition_penalty != 1 else None,
                            counts=torch.zeros(V) if params.presence_penalty or params.frequency_penalty else None,
                            generator=None if params.greedy else torch.Generator().manual_seed(s))
            for i, s in enumerate(seeds)]
    tokens, _, _ = RowSampler(USABLE).select(rows, logits.clone())
    return tokens


def token_selector_tokens(params: GenerationParams, logits: torch.Tensor, seen: torch.Tensor, seeds: list[int]):
    sel = TokenSelector(params, len(seeds), V, USABLE, torch.device("cpu"), seeds)
    for i in range(len(seeds)):
        sel.observe_prompt(i, torch.nonzero(seen[i]).squeeze(1).tolist())
    return sel.select(sel.mask_vocab(logits.clone())).tolist()


@pytest.mark.parametrize("options", EXTREMES, ids=lambda o: ",".join(f"{k}={v:g}" for k, v in o.items()))
def test_extremes_give_a_finite_distribution_and_both_samplers_agree(options):
    params = GenerationParams(max_new_tokens=1, **options).validated()
    logits, seen = logits_and_seen()
    seeds = [1, 2, 3]
    scores = penalize(logits, seen if params.repetition_penalty != 1 else None, None, params)
    assert not torch.isnan(scores).any() and not torch.isposinf(scores).any()
    assert torch.isneginf(scores[:, USABLE:]).all()  # penalties never unmask padding
    if not params.greedy:
        probs = sampling_probs(scores, [params] * 3)
        assert torch.isfinite(probs).all() and (probs >= 0).all()
        assert torch.allclose(probs.sum(dim=-1), torch.ones(3))
        assert (probs[:, USABLE:] == 0).all()
    for draw in range(3):
        got = row_sampler_tokens(params, logits, seen, [s + 10 * draw for s in seeds])
        assert got == token_selector_tokens(params, logits, seen, [s + 10 * draw for s in seeds])
        assert all(0 <= t < USABLE for t in got)


def test_what_the_extremes_mean():
    logits, seen = logits_and_seen(batch=1)
    best = int(logits.argmax())
    # A huge temperature is the uniform distribution over the usable vocabulary.
    uniform = sampling_probs(logits, [GenerationParams(temperature=1e300)])
    assert torch.allclose(uniform[0, :USABLE], torch.full((USABLE,), 1 / USABLE))
    # top-k keeps its tokens whatever the temperature, even one that makes the rest uniform.
    assert sampling_probs(logits, [GenerationParams(temperature=1e300, top_k=1)])[0, best] == 1
    top3 = sampling_probs(logits, [GenerationParams(temperature=1e300, top_k=3)])[0]
    assert torch.allclose(top3[torch.topk(logits[0], 3).indices], torch.full((3,), 1 / 3)) and top3.sum() == 1
    # The smallest top_p keeps only the most likely token; a top_k beyond the vocabulary changes nothing.
    assert sampling_probs(logits, [GenerationParams(temperature=1.0, top_p=5e-324)])[0, best] == 1
    assert torch.equal(sampling_probs(logits, [GenerationParams(temperature=0.7, top_k=10**30)]),
                       sampling_probs(logits, [GenerationParams(temperature=0.7)]))
    # A tiny repetition penalty makes the best seen token with a positive logit win; a huge one makes seen
    # tokens with positive logits lose to every unseen one with a higher logit than the penalized value.
    seen_positive = [i for i in range(6) if logits[0, i] > 0]
    tiny = penalize(logits, seen, None, GenerationParams(repetition_penalty=1e-300))
    assert int(tiny.argmax()) == max(seen_positive, key=lambda i: float(logits[0, i]))
    huge = penalize(logits, seen, None, GenerationParams(repetition_penalty=1e300))
    assert torch.isfinite(huge[0, :USABLE]).all() and int(huge.argmax()) >= 6


@pytest.fixture(scope="module")
def gptj():
    # GPT-J's vocabulary is padded (50400 rows, 50257 tokens): the masked rows are -inf in every step.
    torch.manual_seed(0)
    config = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 64, "n_embd": 32, "n_layer": 1,
              "n_head": 4, "rotary_dim": 4}
    return neoj.from_config(from_hf_dict(config), dtype="float32", device="cpu")


@pytest.mark.parametrize("options", EXTREMES, ids=lambda o: ",".join(f"{k}={v:g}" for k, v in o.items()))
def test_python_api_generates_with_every_accepted_extreme(gptj, options):
    text = gptj.generate("Hello there", max_new_tokens=4, seed=3, stop_at_eos=False, **options)
    assert isinstance(text, str)
    assert "".join(gptj.stream("Hello there", max_new_tokens=4, seed=3, stop_at_eos=False, **options)) == text


@pytest.mark.parametrize("t", TINY)
def test_python_api_tiny_temperature_equals_greedy(gptj, t):
    greedy = gptj.generate("Hello there", max_new_tokens=6, temperature=0, stop_at_eos=False)
    assert gptj.generate("Hello there", max_new_tokens=6, temperature=t, seed=1, stop_at_eos=False) == greedy
