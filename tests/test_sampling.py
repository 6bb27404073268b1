"""The sampler: transformers' semantics for every knob, values at their extremes, rows independent of their
batch mates (engine.Sampler over sampling.penalize and sampling.sampling_probs)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

import neoj
from neoj.config import from_hf_dict
from neoj.engine import Sampler
from neoj.errors import GenerationError
from neoj.sampling import FLOAT32_MAX, GREEDY_TEMPERATURE, GenerationParams, penalize, sampling_probs

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
    dict(min_p=1.0), dict(typical_p=5e-324), dict(typical_p=1e-9, min_p=1.0, top_k=3),
    dict(temperature=1e300, min_p=0.5, typical_p=0.5), dict(temperature=1e-5, min_p=0.9, typical_p=0.2),
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


def sampler_rows(params: GenerationParams, batch: int, vocab: int, seen: list[list[int]] | None,
                 seeds: list[int]) -> list[SimpleNamespace]:
    """Returns rows as the Sampler reads them (a Sequence's params, penalty state and generator)."""
    rows = []
    for i, seed in enumerate(seeds):
        row_seen = None
        if params.repetition_penalty != 1:
            row_seen = torch.zeros(vocab, dtype=torch.bool)
            row_seen[list((seen or [[]] * batch)[i])] = True
        counts = torch.zeros(vocab) if params.presence_penalty or params.frequency_penalty else None
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        rows.append(SimpleNamespace(params=params, seen=row_seen, counts=counts, generator=generator, matcher=None))
    return rows


def seen_lists(seen: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).squeeze(1).tolist() for row in seen]


def sampler_tokens(params: GenerationParams, logits: torch.Tensor, seen: torch.Tensor, seeds: list[int]):
    rows = sampler_rows(params, len(seeds), V, seen_lists(seen), seeds)
    return Sampler(USABLE).select(rows, logits.clone()).to_host()[0]


def reference_tokens(params: GenerationParams, logits: torch.Tensor, seen: torch.Tensor, seeds: list[int]):
    """Each row alone, straight from the definitions: penalize, then argmax or a draw from sampling_probs."""
    out = []
    for i, seed in enumerate(seeds):
        row = logits[i : i + 1].clone()
        row[:, USABLE:] = float("-inf")
        scores = penalize(row, seen[i : i + 1] if params.repetition_penalty != 1 else None, None, params)
        if params.greedy:
            out.append(int(scores.argmax()))
        else:
            probs = sampling_probs(scores, [params])
            out.append(int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))))
    return out


@pytest.mark.parametrize("options", EXTREMES, ids=lambda o: ",".join(f"{k}={v:g}" for k, v in o.items()))
def test_extremes_give_a_finite_distribution_and_each_row_its_own_draw(options):
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
        got = sampler_tokens(params, logits, seen, [s + 10 * draw for s in seeds])
        assert got == reference_tokens(params, logits, seen, [s + 10 * draw for s in seeds])
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


class SpyMultinomial:
    """Stands in for torch.multinomial, recording the probabilities the Sampler samples from."""

    def __init__(self):
        self.real = torch.multinomial
        self.probs: list[torch.Tensor] = []

    def __call__(self, probs, num_samples, **kwargs):
        self.probs.append(probs.clone())
        return self.real(probs, num_samples, **kwargs)


def sampled_distribution(monkeypatch, params: GenerationParams, logits: torch.Tensor,
                         seen: list[list[int]] | None = None) -> torch.Tensor:
    """Returns the (B, V) distribution the Sampler samples the next tokens from."""
    B, V = logits.shape
    rows = sampler_rows(params.validated(), B, V, seen, list(range(B)))
    spy = SpyMultinomial()
    monkeypatch.setattr(torch, "multinomial", spy)
    tokens = Sampler(V).select(rows, logits.clone()).tokens
    monkeypatch.undo()
    probs = torch.cat(spy.probs)
    assert probs.shape == (B, V)
    assert bool((probs.gather(1, tokens[:, None]) > 0).all())
    return probs


def fixed_logits(B: int = 3, V: int = 64) -> torch.Tensor:
    """Returns seeded logits with no ties."""
    return torch.randn(B, V, generator=torch.Generator().manual_seed(1234)) * 2


@pytest.mark.parametrize("top_k", [1, 5, 20, 64])
def test_top_k_mask_matches_transformers(monkeypatch, top_k):
    logits = fixed_logits()
    probs = sampled_distribution(monkeypatch, GenerationParams(temperature=1.0, top_k=top_k), logits)
    ref = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(probs > 0, torch.isfinite(ref))
    torch.testing.assert_close(probs, ref.softmax(-1))


def test_top_k_keeps_ties_like_transformers(monkeypatch):
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.5, 2.0]])
    probs = sampled_distribution(monkeypatch, GenerationParams(temperature=1.0, top_k=2), logits)
    assert torch.equal(probs > 0, torch.isfinite(TopKLogitsWarper(2)(None, logits.clone())))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.95, 1.0])
def test_top_p_mask_matches_transformers(monkeypatch, top_p):
    logits = fixed_logits()
    probs = sampled_distribution(monkeypatch, GenerationParams(temperature=1.0, top_p=top_p), logits)
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(probs > 0, torch.isfinite(ref))
    torch.testing.assert_close(probs, ref.softmax(-1))


@pytest.mark.parametrize("top_p, kept", [(0.75, 3), (0.5, 2), (0.25, 1)])
def test_top_p_boundary_matches_transformers(monkeypatch, top_p, kept):
    """Four equal tokens: cumulative probabilities are exactly 0.25, 0.5, 0.75, 1. A token whose
    cumulative probability equals 1 - top_p is removed, as transformers removes it."""
    logits = torch.zeros(1, 4)
    probs = sampled_distribution(monkeypatch, GenerationParams(temperature=1.0, top_p=top_p), logits)
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    assert int(torch.isfinite(ref).sum()) == kept
    assert torch.equal(probs > 0, torch.isfinite(ref))


def test_temperature_top_k_top_p_chain_matches_transformers(monkeypatch):
    logits = fixed_logits()
    params = GenerationParams(temperature=0.7, top_k=12, top_p=0.8)
    probs = sampled_distribution(monkeypatch, params, logits)
    ref = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.8)):
        ref = warper(None, ref)
    assert torch.equal(probs > 0, torch.isfinite(ref))
    torch.testing.assert_close(probs, ref.softmax(-1))


def test_repetition_penalty_hand_made_example():
    """transformers' (CTRL) penalty: a seen token's logit is divided by the penalty when positive and
    multiplied when negative, once however often it was seen."""
    logits = torch.tensor([
        [2.0, 1.8, -3.0, -4.0],   # seen 0: 2.0 / 1.2 = 1.67 < 1.8, so 1 wins
        [-1.0, -1.1, -5.0, -6.0],  # seen 0: -1.0 * 1.2 = -1.2 < -1.1, so 1 wins (dividing would keep 0)
        [2.0, 1.5, -3.0, -4.0],   # seen 0 twice: 2.0 / 1.2 = 1.67 > 1.5, so 0 still wins (penalised once)
        [1.0, 1.1, -3.0, -4.0],   # seen 0 and 1: 0.83 vs 0.92, so 1 wins
    ])
    seen = [[0], [0], [0, 0], [0, 1]]
    params = GenerationParams(temperature=0, repetition_penalty=1.2).validated()
    rows = sampler_rows(params, 4, 4, seen, [0] * 4)
    processor = RepetitionPenaltyLogitsProcessor(1.2)
    expected = [int(processor(torch.tensor([ids]), logits[row : row + 1].clone()).argmax()) for row, ids in
                enumerate(seen)]
    assert expected == [1, 1, 0, 1]
    assert Sampler(4).select(rows, logits.clone()).to_host()[0] == expected


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_distribution_matches_transformers(monkeypatch, penalty):
    logits = fixed_logits()
    seen = [[0, 5, 9, 9, 30], [1, 2, 3], [63, 0, 17]]
    probs = sampled_distribution(monkeypatch, GenerationParams(temperature=1.0, repetition_penalty=penalty),
                                 logits, seen)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    ref = torch.cat([processor(torch.tensor([ids]), logits[r : r + 1].clone()) for r, ids in enumerate(seen)])
    torch.testing.assert_close(probs, ref.softmax(-1))


def test_a_mixed_batch_gives_each_row_what_it_gives_alone():
    """Rows with different parameters (greedy, sampled, penalized, sharing a params object or not) in one
    select: every row's token, logprob and top logprobs equal those of the row selected alone."""
    logits, seen = logits_and_seen(batch=6, seed=3)
    shared = GenerationParams(temperature=0.9, top_k=20, repetition_penalty=1.4, logprobs=2).validated()
    params = [GenerationParams(temperature=0).validated(), shared, shared,
              GenerationParams(temperature=1.3, top_p=0.7, frequency_penalty=1.0).validated(),
              GenerationParams(temperature=0, presence_penalty=1.5, logprobs=0).validated(), shared]
    rows = [sampler_rows(p, 1, V, [seen_lists(seen)[i]], [40 + i])[0] for i, p in enumerate(params)]
    for row in rows:
        if row.counts is not None:
            row.counts[:4] = 2.0
    batch = Sampler(USABLE).select(rows, logits.clone()).to_host()
    for i, p in enumerate(params):
        alone = sampler_rows(p, 1, V, [seen_lists(seen)[i]], [40 + i])[0]
        if alone.counts is not None:
            alone.counts[:4] = 2.0
        got = Sampler(USABLE).select([alone], logits[i : i + 1].clone()).to_host()
        assert [batch[0][i], batch[1][i], batch[2][i]] == [got[0][0], got[1][0], got[2][0]]
    assert batch[1][0] is None and batch[1][4] is not None and batch[2][4] is None and len(batch[2][1]) == 2


def test_the_chosen_tokens_enter_the_penalty_state():
    params = GenerationParams(temperature=0, repetition_penalty=1.2, frequency_penalty=0.5).validated()
    rows = sampler_rows(params, 2, V, [[], []], [0, 0])
    logits = torch.zeros(2, V)
    logits[0, 7], logits[1, 9] = 5.0, 5.0
    assert Sampler(USABLE).select(rows, logits).to_host()[0] == [7, 9]
    assert rows[0].seen.nonzero().squeeze(1).tolist() == [7] and rows[1].counts[9] == 1 and rows[1].counts.sum() == 1


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


# ---- min-p, typical-p and logit_bias (issue 15) ----

def transformers_chain(logits: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """Returns the distribution transformers samples from: its warpers in _get_logits_processor's order."""
    warpers = [TemperatureLogitsWarper(p.temperature)] if p.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(p.top_k)] if p.top_k else []
    warpers += [TopPLogitsWarper(p.top_p)] if p.top_p < 1.0 else []
    warpers += [MinPLogitsWarper(p.min_p)] if p.min_p else []
    warpers += [TypicalLogitsWarper(p.typical_p)] if p.typical_p < 1.0 else []
    scores = logits.clone()
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(-1)


MIXED = [dict(temperature=1.0, min_p=0.05), dict(temperature=0.7, min_p=0.3), dict(temperature=1.0, min_p=1.0),
         dict(temperature=1.0, typical_p=0.2), dict(temperature=1.3, typical_p=0.9),
         dict(temperature=1.0, typical_p=0.5),
         dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.1, typical_p=0.8), dict(temperature=1.0),
         dict(temperature=2.0, top_p=0.6, typical_p=0.95), dict(temperature=0.9, top_k=5, min_p=0.2)]


@pytest.mark.parametrize("options", MIXED, ids=lambda o: ",".join(f"{k}={v:g}" for k, v in o.items()))
def test_min_p_and_typical_p_match_transformers(monkeypatch, options):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(7)) * 3
    params = GenerationParams(**options)
    probs = sampled_distribution(monkeypatch, params, logits)
    ref = transformers_chain(logits, params)
    assert torch.equal(probs > 0, ref > 0)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)


def test_a_batch_mixing_warper_settings_gives_each_row_its_own_distribution():
    """One sampling_probs call over rows with min-p, typical-p, both or neither: each row's distribution is
    transformers' for that row alone, so rows with a knob off are untouched by it."""
    g = torch.Generator().manual_seed(11)
    params = [GenerationParams(**o) for o in MIXED]
    logits = torch.randn(len(params), 500, generator=g) * 4
    probs = sampling_probs(logits, params)
    for i, p in enumerate(params):
        ref = transformers_chain(logits[i : i + 1], p)
        assert torch.equal(probs[i : i + 1] > 0, ref > 0), p
        torch.testing.assert_close(probs[i : i + 1], ref, atol=1e-6, rtol=0)


def test_warper_edge_cases_keep_a_token_and_stay_finite():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)) * 5
    best = logits.argmax(-1)
    one_hot = torch.nn.functional.one_hot(best, 64).float()
    # min_p=1 keeps the best token only (no ties here); a tiny typical_p keeps the one most typical token.
    assert torch.equal(sampling_probs(logits, [GenerationParams(temperature=1.0, min_p=1.0)] * 3), one_hot)
    tiny = sampling_probs(logits, [GenerationParams(temperature=1.0, typical_p=5e-324)] * 3)
    assert ((tiny > 0).sum(-1) == 1).all() and torch.allclose(tiny.sum(-1), torch.ones(3))
    # min_p=1 keeps every token tied with the best, as transformers does.
    ties = torch.tensor([[2.0, 5.0, 5.0, 1.0]])
    assert (sampling_probs(ties, [GenerationParams(temperature=1.0, min_p=1.0)]) > 0).tolist() == \
        [[False, True, True, False]]
    # Huge and tiny temperatures with both warpers: finite distributions over usable tokens.
    for t in (1e300, FLOAT32_MAX * 10, 1e-5):
        probs = sampling_probs(logits, [GenerationParams(temperature=t, min_p=0.5, typical_p=0.5)] * 3)
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(3))
    # min_p=0 and typical_p=1 are off: the same distribution as without them.
    assert torch.equal(sampling_probs(logits, [GenerationParams(temperature=0.7, min_p=0.0, typical_p=1.0)] * 3),
                       sampling_probs(logits, [GenerationParams(temperature=0.7)] * 3))


def test_logit_bias_is_added_before_the_penalties_and_reaches_greedy_rows():
    logits, seen = logits_and_seen(batch=2)
    bias = {3: 2.5, 10: -1.0, 0: 100.0}
    p = GenerationParams(repetition_penalty=1.3, logit_bias=bias).validated()
    biased = logits.clone()
    for token, value in bias.items():
        biased[:, token] += value
    ref = torch.cat([RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), biased[r : r + 1].clone())
                     for r, ids in enumerate(seen_lists(seen))])
    torch.testing.assert_close(penalize(logits, seen, None, p), ref)
    # Alone (no penalty state), penalize still applies the bias: the Sampler's rows with a bias go through it.
    torch.testing.assert_close(penalize(logits, None, None, GenerationParams(logit_bias=bias).validated()), biased)
    assert penalize(logits, None, None, GenerationParams()) is logits


def test_logit_bias_plus_100_is_always_chosen_and_minus_100_never_greedily():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2)) * 5
    logits[:, USABLE:] = float("-inf")
    best = logits.argmax(-1).tolist()
    for temperature in (0.0, 0.5, 1.0):
        forced = GenerationParams(temperature=temperature, logit_bias={17: 100}).validated()
        rows = sampler_rows(forced, 4, V, None, [1, 2, 3, 4])
        assert Sampler(USABLE).select(rows, logits.clone()).to_host()[0] == [17] * 4
    banned = GenerationParams(temperature=0, logit_bias={t: -100 for t in best}).validated()
    tokens = Sampler(USABLE).select(sampler_rows(banned, 4, V, None, [0] * 4), logits.clone()).to_host()[0]
    assert all(t not in best for t in tokens)
    plain = GenerationParams(temperature=0)
    mixed = [sampler_rows(banned, 1, V, None, [0])[0], sampler_rows(plain, 1, V, None, [0])[0]]
    tokens = Sampler(USABLE).select(mixed, logits[:2].clone()).to_host()[0]
    assert tokens[0] != best[0] and tokens[1] == best[1]  # the bias is that row's only


@pytest.mark.parametrize("name, value", [("min_p", -0.1), ("min_p", 1.5), ("min_p", math.nan), ("typical_p", 0.0),
                                         ("typical_p", 1.01), ("typical_p", math.inf), ("min_p", True)])
def test_warper_values_out_of_range_are_refused_naming_the_field(name, value):
    with pytest.raises(GenerationError, match=name):
        GenerationParams(**{name: value}).validated()


@pytest.mark.parametrize("bias", [{"-1": 1}, {-1: 1}, {"a": 1}, {"1.5": 1}, {1.5: 1}, {True: 1}, {"²": 1},
                                  {1: 101}, {1: -100.5}, {1: math.nan}, {1: "1"}, {1: True}, {"5": 1, 5: 2},
                                  {i: 1 for i in range(301)}, [1, 2]])
def test_bad_logit_bias_is_refused_naming_the_field(bias):
    with pytest.raises(GenerationError, match="logit_bias"):
        GenerationParams(logit_bias=bias).validated()


def test_logit_bias_takes_json_string_keys_and_checks_the_vocabulary(gptj):
    p = GenerationParams(logit_bias={"50": -100, 7: 100.0, "0": 0}).validated()
    assert p.logit_bias == {50: -100.0, 7: 100.0, 0: 0.0}
    assert GenerationParams(logit_bias={i: 1 for i in range(300)}).validated()
    out = gptj.complete("Hello there", max_new_tokens=5, temperature=0, stop_at_eos=False, logit_bias={"314": 100})
    assert out[0].token_ids == [314] * 5
    with pytest.raises(GenerationError, match="logit_bias"):
        gptj.generate("Hello", max_new_tokens=2, logit_bias={50257: 5})  # a padding row of GPT-J's embedding
