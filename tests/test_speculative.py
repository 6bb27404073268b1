"""Speculative decoding: greedy output equals plain decoding token for token (prompt lookup and draft models, both
families, local windows, batches whose rows accept different numbers of guesses, the static step); sampled output
keeps the model's distribution (rejection sampling), tested statistically."""

import copy

import numpy as np
import pytest
import torch

import neoj
from neoj.config import from_hf_dict
from neoj.cuda_graph import GraphedDecodeStep
from neoj.engine import Engine, Speculative
from neoj.engine.speculation import Proposal, StepTimes, lookup_ngram
from neoj.errors import NeojError
from neoj.quantize import QuantSpec, quantize_model
from neoj.sampling import GenerationParams, speculative_accept

NEO = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
       "num_layers": 4, "num_heads": 4, "attention_types": [[["global", "local"], 2]], "window_size": 8}
NEO_LOCAL = dict(NEO, num_layers=2, attention_types=[[["local"], 2]], window_size=4)
GPTJ = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 128, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "rotary_dim": 4, "tie_word_embeddings": True}  # tied: a random model then repeats, so guesses hit
CONFIGS = {"neo": NEO, "neo_local": NEO_LOCAL, "gptj": GPTJ}

# Repetitive prompts, so prompt lookup finds n-grams to propose; of varied lengths, most beyond the local window.
PROMPTS = ["one two three one two three one two three one two",
           "The cat sat on the mat. The cat sat on the mat. The cat",
           "a b c d e f a b c d e f a b",
           "Hello hello hello"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, seed: int = 0) -> neoj.LanguageModel:
    """A random tiny model whose greedy text repeats itself in places and changes in others (its layers' weights
    scaled up from the small default init), so guesses are both accepted and rejected."""
    torch.manual_seed(seed)
    lm = neoj.from_config(from_hf_dict(CONFIGS[name]), dtype="float32", device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.startswith("blocks") and p.dim() == 2:
                p.mul_(5.0).add_(torch.randn(p.shape, generator=gen) * 0.01)
    return lm


@pytest.fixture(scope="module", params=["neo", "neo_local", "gptj"])
def lm(request):
    return tiny(request.param)


def greedy(n=40, **kw):
    return GenerationParams(max_new_tokens=n, temperature=0, stop_at_eos=False, **kw)


def run(lm, prompts, params, speculative=None, **engine_kw):
    """Returns (completions, engine) after generating prompts together in one private engine."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=8, speculative=speculative, **engine_kw)
    req = engine.submit([lm.tokenizer.encode(p) for p in prompts], params, lambda e: None)
    engine.run_until_done()
    return [s.completion() for s in req.seqs], engine


def assert_same_tokens(plain, spec):
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert [c.text for c in spec] == [c.text for c in plain]
    assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]


# ---- the pieces ----

def test_lookup_proposes_what_followed_the_latest_longest_match():
    ctx = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert lookup_ngram(ctx, 3, max_ngram=3, min_ngram=1) == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    assert lookup_ngram(ctx, 1, 3, 1) == [7]
    assert lookup_ngram(np.array([4, 5, 6]), 3, 3, 1) == []  # 6 never occurred before
    assert lookup_ngram(np.array([4, 5, 6, 4]), 3, 3, 2) == []  # only a 1-gram matches; 2 needed
    assert lookup_ngram(np.array([4, 5, 6, 4]), 5, 3, 1) == [5, 6, 4]  # up to the end of the text
    assert lookup_ngram(np.array([7]), 3, 3, 1) == []


def test_speculative_config_checks_its_values():
    assert Speculative.of("prompt_lookup").num_tokens == Speculative.DEFAULT_TOKENS["prompt_lookup"]
    assert Speculative.of(None) is None
    with pytest.raises(NeojError, match="not one of"):
        Speculative("ngram")
    with pytest.raises(NeojError, match="draft model"):
        Speculative("draft")
    with pytest.raises(NeojError, match="num_tokens"):
        Speculative(num_tokens=99)
    with pytest.raises(NeojError, match="n-gram"):
        Speculative(min_ngram=3, max_ngram=2)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails one run in a thousand,
# and the seeds below are fixed, so the test is deterministic.
CRITICAL = {4: 18.47, 5: 20.52}


@pytest.mark.parametrize("draft", ["distribution", "certain"])
def test_rejection_sampling_keeps_the_target_distribution(draft):
    """Each emitted position has the target's distribution, whatever the draft proposed."""
    V, N = 6, 20000
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, dim=-1)  # target at positions 0, 1 and the bonus
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, dim=-1)  # a draft that disagrees with it
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(N):
        d = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        accepted, token = speculative_accept(p, d, q if draft == "distribution" else None, g)
        emitted = d[:accepted] + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    assert chi_square(first, p[0].numpy()) < CRITICAL[V - 1]
    assert chi_square(second, p[1].numpy()) < CRITICAL[V - 1]
    assert second.sum() > N / 10  # the accepted path was taken often enough to test


def test_a_draft_equal_to_the_target_is_always_accepted():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 9, generator=g), dim=-1)
    for _ in range(50):
        d = [int(torch.multinomial(p[j], 1, generator=g)) for j in range(3)]
        assert speculative_accept(p, d, p[:3], g)[0] == 3


# ---- greedy equality ----

def test_greedy_prompt_lookup_gives_the_plain_tokens(lm):
    plain, _ = run(lm, PROMPTS, greedy())
    spec, engine = run(lm, PROMPTS, greedy(), Speculative("prompt_lookup", num_tokens=4, adaptive=False))
    assert_same_tokens(plain, spec)
    assert engine.stats.spec_steps > 0 and engine.stats.spec_accepted_tokens > 0
    assert sum(c.drafted_tokens for c in spec) == engine.stats.spec_drafted_tokens
    assert sum(c.accepted_tokens for c in spec) == engine.stats.spec_accepted_tokens


def test_rows_that_accept_different_counts_leave_holes_that_stay_exact(lm):
    """Rows of one batch accept different numbers of guesses: the cache keeps holes, closed again by repack."""
    spec = Speculative("prompt_lookup", num_tokens=6, adaptive=False)
    plain, _ = run(lm, PROMPTS, greedy(60))
    engine = Engine(lm.model, lm.tokenizer, max_batch=8, speculative=spec)
    req = engine.submit([lm.tokenizer.encode(p) for p in PROMPTS], greedy(60), lambda e: None)
    saw_holes = False
    for i in range(200):
        if not engine.step():
            break
        saw_holes = saw_holes or engine.cache.holes
        if i == 8 and engine.cache.holes:
            with torch.inference_mode():
                engine.cache.repack()
            assert not engine.cache.holes
    assert saw_holes
    assert_same_tokens(plain, [s.completion() for s in req.seqs])


def test_the_static_step_reads_positions_across_holes(lm):
    """The graphed step's masks (run here without a graph) measure local windows in positions, not slots."""
    def static(model, cache):
        return GraphedDecodeStep(model, cache, capture=False)

    plain, _ = run(lm, PROMPTS, greedy(50))
    # adaptive: plain (static) steps run between speculative ones, over the holes those leave
    spec, engine = run(lm, PROMPTS, greedy(50), Speculative("prompt_lookup", num_tokens=5), make_step=static)
    assert_same_tokens(plain, spec)
    assert engine.stats.spec_steps > 0


def test_stop_strings_eos_and_the_token_limit_cut_accepted_guesses(lm):
    params = dict(max_new_tokens=23, temperature=0, stop=["three one"], logprobs=2)
    plain, _ = run(lm, PROMPTS, GenerationParams(**params))
    spec, _ = run(lm, PROMPTS, GenerationParams(**params), Speculative("prompt_lookup", adaptive=False))
    assert_same_tokens(plain, spec)
    for a, b in zip(plain, spec):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
        assert [list(t) for t in b.top_logprobs] == [list(t) for t in a.top_logprobs]


def test_a_request_can_opt_out():
    lm = tiny("neo")
    spec, engine = run(lm, PROMPTS, greedy(speculative=False), Speculative("prompt_lookup", adaptive=False))
    assert engine.stats.spec_steps == 0 and all(c.drafted_tokens == 0 for c in spec)


def test_constrained_and_penalized_rows_decode_beside_speculating_ones():
    lm = tiny("neo")
    ids = [lm.tokenizer.encode(p) for p in PROMPTS[:2]]
    jobs = [(ids[0], greedy(30)), (ids[1], greedy(30, repetition_penalty=1.3))]

    def drive(engine):
        reqs = [engine.submit([i], p, lambda e: None) for i, p in jobs]
        engine.run_until_done()
        return [r.seqs[0].completion().token_ids for r in reqs]

    plain = drive(Engine(lm.model, lm.tokenizer, max_batch=4))
    engine = Engine(lm.model, lm.tokenizer, max_batch=4, speculative=Speculative("prompt_lookup", adaptive=False))
    assert drive(engine) == plain
    assert engine.stats.spec_steps > 0


@pytest.mark.parametrize("draft_kind", ["other", "self", "int8", "int4"])
def test_greedy_draft_model_gives_the_plain_tokens(lm, draft_kind):
    cfg = lm.config
    if draft_kind == "other":  # a different random model: mostly wrong guesses, a GPT-Neo draft for GPT-J too
        draft = tiny("neo", seed=7).model
    elif draft_kind == "self":
        draft = lm.model  # always right: every guess accepted
    else:
        draft = quantize_model(copy.deepcopy(lm.model), QuantSpec.parse(draft_kind, 32))
    plain, _ = run(lm, PROMPTS, greedy(30))
    spec, engine = run(lm, PROMPTS, greedy(30), Speculative("draft", draft=draft, num_tokens=3, adaptive=False))
    assert_same_tokens(plain, spec)
    assert engine.stats.spec_drafted_tokens > 0
    if draft_kind == "self":
        assert engine.stats.spec_accepted_tokens == engine.stats.spec_drafted_tokens
    assert cfg.n_positions == 128


def test_a_draft_with_too_few_embeddings_is_refused():
    lm = tiny("neo")
    small = neoj.from_config(from_hf_dict(dict(NEO, vocab_size=1000)), dtype="float32", device="cpu")
    with pytest.raises(NeojError, match="share the model's tokenizer"):
        Engine(lm.model, lm.tokenizer, speculative=Speculative("draft", draft=small))


def test_rows_near_the_end_of_the_context_stop_guessing():
    lm = tiny("neo")
    prompt = lm.tokenizer.encode(PROMPTS[0]) * 12
    prompt = prompt[-(lm.config.n_positions - 10):]
    params = GenerationParams(max_new_tokens=10, temperature=0, stop_at_eos=False)
    plain, _ = run(lm, [lm.tokenizer.decode(prompt)], params)
    spec, _ = run(lm, [lm.tokenizer.decode(prompt)], params, Speculative("prompt_lookup", num_tokens=8,
                                                                         adaptive=False))
    assert_same_tokens(plain, spec)


# ---- sampled: the model's distribution ----

def exact_two_token_distribution(lm, prompt: list[int], top_k: int):
    """Returns {(t1, t2): probability} under top-k sampling at temperature 1, by enumeration."""
    def dist(ids):
        logits = lm.model.logits(lm.model(torch.tensor([ids]))[0, -1])
        top = torch.topk(logits, top_k)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))

    with torch.inference_mode():
        return {(a, b): pa * pb for a, pa in dist(prompt).items() for b, pb in dist(prompt + [a]).items()}


class CertainGuess:
    """A proposer that always guesses one given token (a certain guess, as prompt lookup's)."""

    def __init__(self, token: int):
        self.token = token

    def propose(self, seqs, budgets):
        return Proposal([[self.token] if k else [] for k in budgets], [None] * len(seqs))

    def accepted(self, seqs, proposal, accepted):
        pass

    def forget(self):
        pass


@pytest.mark.parametrize("method", ["certain", "draft"])
def test_sampled_speculation_keeps_the_model_distribution(method):
    """Vocabulary restricted by top-k = 3: the joint distribution of the first two tokens (the second chosen by
    a verification step) matches the exact one computed by enumeration."""
    lm = tiny("neo")
    prompt = lm.tokenizer.encode(PROMPTS[0])
    exact = exact_two_token_distribution(lm, prompt, 3)
    spec = Speculative("prompt_lookup", num_tokens=1, adaptive=False) if method == "certain" else \
        Speculative("draft", draft=tiny("neo", seed=3).model, num_tokens=2, adaptive=False)
    params = GenerationParams(max_new_tokens=3, temperature=1.0, top_k=3, stop_at_eos=False,
                              num_return_sequences=500, seed=11)
    counts: dict[tuple[int, int], int] = {}
    engine = Engine(lm.model, lm.tokenizer, max_batch=500, speculative=spec)
    if method == "certain":  # prompt lookup's kind of guess, made every step: the second token's likeliest value
        likeliest = max(exact, key=exact.get)[1]
        engine.batch.speculator.proposer = CertainGuess(likeliest)
    for r in range(4):
        params.seed = 1000 * r
        req = engine.submit([prompt], params, lambda e: None)
        engine.run_until_done()
        for s in req.seqs:
            key = tuple(s.token_ids[:2])
            counts[key] = counts.get(key, 0) + 1
    assert engine.stats.spec_drafted_tokens > 0
    assert 0 < engine.stats.spec_accepted_tokens < engine.stats.spec_drafted_tokens  # both paths taken
    cells = sorted(exact)
    assert set(counts) <= set(cells)
    observed = np.array([counts.get(c, 0) for c in cells], dtype=float)
    probs = np.array([exact[c] for c in cells])
    statistic = chi_square(observed, probs / probs.sum())
    assert statistic < 27.88  # chi-square, 8 degrees of freedom, p = 0.001


# ---- when speculation does not pay ----

def test_speculation_turns_itself_off_when_it_is_slower():
    """The first step runs plain (measured); once guessing measures slower per token, probes back off."""
    times = StepTimes()
    assert times.choose() is False  # step 1: plain, to time it
    times.record(False, seconds=0.5, tokens=1)  # 0.5 s per token without guesses
    assert times.choose() is True
    times.record(True, seconds=3.0, tokens=3)  # 1 s per token with them
    assert not times.paying
    tried = [step for step in range(3, 300) if times.choose()]
    every = StepTimes.PROBE_EVERY
    assert tried[:3] == [2 + every, 2 + 3 * every, 2 + 7 * every]  # each probe waits twice as long as the last
    times.record(True, seconds=0.3, tokens=3)  # guesses pay again (two probes move the average below 0.5 s)
    times.record(True, seconds=0.3, tokens=3)
    assert times.paying and times.choose() in (True, False)
    assert sum(times.choose() for _ in range(every)) == every - 1  # a plain step in PROBE_EVERY re-measures


def test_what_adaptive_learns_outlives_one_call():
    """The library builds an engine per call; the Speculative they share keeps the timings."""
    lm = tiny("neo")
    spec = Speculative("prompt_lookup")
    run(lm, PROMPTS[:1], greedy(20), spec)
    steps = spec.times.steps
    assert steps > 0 and spec.times.seconds_per_token[False] is not None
    run(lm, PROMPTS[:1], greedy(20), spec)
    assert spec.times.steps > steps


def test_run_ahead_batches_still_speculate():
    """A batch that queues its next step ahead (CUDA's run-ahead, forced here on CPU) leaves room for guessed steps."""
    lm = tiny("neo")
    plain, _ = run(lm, PROMPTS, greedy(40))
    engine = Engine(lm.model, lm.tokenizer, max_batch=8, speculative=Speculative("prompt_lookup"))
    engine.batch.run_ahead = True
    req = engine.submit([lm.tokenizer.encode(p) for p in PROMPTS], greedy(40), lambda e: None)
    engine.run_until_done()
    assert_same_tokens(plain, [s.completion() for s in req.seqs])
    assert engine.stats.spec_steps > 0
