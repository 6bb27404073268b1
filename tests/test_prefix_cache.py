"""The prefix cache: prompts that reuse cached keys and values give what they give without it (greedy tokens
identical, logits within 1e-5 in fp32) for GPT-Neo's local layers and GPT-J's rotary positions, for prefixes
shorter and longer than the local window; blocks are keyed by adapter, bounded in bytes, evicted LRU."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import EOS, PROMPTS, WINDOW, neoj_logits
from neoj.engine import Engine, PrefixCache
from neoj.engine.prefill import prefill, prefill_groups
from neoj.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from neoj.sampling import GenerationParams

BLOCK = 4
TOL = dict(atol=1e-5, rtol=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(family) -> list[int]:
    """Returns 40 token ids of real text, longer than several local windows."""
    ids = family.lm.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[2])
    assert len(ids) >= 40
    return ids[:40]


def greedy(n=6, **kw) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, temperature=0, stop_at_eos=False, logprobs=0, **kw)


def make_engine(tiny, cache=None, **kw) -> Engine:
    return Engine(tiny.model, tiny.lm.tokenizer, max_batch=16, prefix_cache=cache, **kw)


def run(engine, prompts, params=None, **options) -> list:
    """Submits each prompt as its own request (admitted together), runs them; returns each one's Completions."""
    requests = [engine.submit([ids], params or greedy(), lambda e: None, **options) for ids in prompts]
    engine.run_until_done()
    return [[seq.completion() for seq in req.seqs] for req in requests]


def alone(tiny, prompts, params=None, **options) -> list:
    """Returns each prompt's Completions, run by itself on an engine without a prefix cache."""
    return [run(make_engine(tiny), [ids], params, **options)[0] for ids in prompts]


def assert_same(got, ref) -> None:
    """Asserts equal tokens and log-probabilities within 1e-5 (each request's completions)."""
    for g, r in zip(got, ref, strict=True):
        for a, b in zip(g, r, strict=True):
            assert a.token_ids == b.token_ids
            if b.logprobs is not None:
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), **TOL)


@pytest.mark.parametrize("shared", [WINDOW - 2, WINDOW + 5])
def test_second_request_reuses_the_first_ones_prefix(family, text, shared):
    """Shorter and longer than the local window: the second prompt reuses the blocks of the first."""
    first, second = text[:shared] + text[30:35], text[:shared] + text[36:39]
    cache = PrefixCache(1 << 20, BLOCK)
    engine = make_engine(family, cache)
    got = [run(engine, [first])[0], run(engine, [second])[0]]
    assert_same(got, alone(family, [first, second]))
    assert [c[0].cached_tokens for c in got] == [0, shared // BLOCK * BLOCK]


@torch.inference_mode()
def test_prefill_logits_with_cached_prefixes_equal_full_prefills(family, text):
    """Rows of one prefill with different hits and suffix lengths: first-token logits within 1e-5 of each
    prompt's own unpadded forward, and the cache rows hold the same keys and values."""
    cache = PrefixCache(1 << 20, BLOCK)
    run(make_engine(family, cache), [text[:30]], greedy(1))
    prompts = [text[:6] + text[31:33], text[:13] + text[33:37], text[:30] + [text[39]], text[:21], text[32:37],
               text[35:37]]
    engine = make_engine(family)
    seqs = [engine.submit([ids], greedy(), lambda e: None).seqs[0] for ids in prompts]
    hits = [cache.lookup(ids) for ids in prompts]
    assert [h.tokens if h else 0 for h in hits] == [4, 12, 28, 20, 0, 0]
    for group in ([0, 1, 2, 3, 4, 5], [1, 3], [2]):  # different runs, all runs equal, one row
        done = prefill(family.model, [seqs[i] for i in group], EOS, None, [hits[i] for i in group])
        full = prefill(family.model, [seqs[i] for i in group], EOS)
        for i, got, ref in zip(group, done, full):
            n = len(prompts[i])
            torch.testing.assert_close(got.logits[0], neoj_logits(family.lm, prompts[i])[-1], **TOL)
            torch.testing.assert_close(got.logits, ref.logits, **TOL)
            for a, b in ((got.cache.k, ref.cache.k), (got.cache.v, ref.cache.v)):
                mine, theirs = a[:, got.row, :, got.end - n : got.end], b[:, ref.row, :, ref.end - n : ref.end]
                torch.testing.assert_close(mine, theirs, **TOL)
        if len(group) == 1:
            assert done[0].cached_tokens == hits[group[0]].tokens


def test_prompts_admitted_together_with_different_hits(family, text):
    """One round admits prompts of different hit and suffix lengths (prefilled in place, or in several groups
    spliced in under a small prefill budget), and a prompt joining a running batch."""
    prompts = [text[:6] + text[31:33], text[:13] + text[33:37], text[:30] + [text[39]], text[:21], text[32:37],
               text[35:37]]
    ref = alone(family, prompts)
    for budget in (2048, 8):
        cache = PrefixCache(1 << 20, BLOCK)
        engine = make_engine(family, cache, prefill_tokens=budget)
        run(engine, [text[:30]], greedy(1))
        got = run(engine, prompts)
        assert_same(got, ref)
        # Each prompt reuses at least half its hit: some recompute the end of theirs beside longer runs.
        for completions, hit in zip(got, [4, 12, 28, 20, 0, 0]):
            assert hit / 2 <= completions[0].cached_tokens <= hit
    # Joining a running batch: prefilled apart and spliced in.
    engine = make_engine(family, PrefixCache(1 << 20, BLOCK))
    first = engine.submit([text[:17]], greedy(12), lambda e: None)
    for _ in range(3):
        engine.step()
    later = [engine.submit([ids], greedy(), lambda e: None) for ids in prompts[:3]]
    engine.run_until_done()
    assert_same([[first.seqs[0].completion()]], alone(family, [text[:17]], greedy(12)))
    assert_same([[r.seqs[0].completion()] for r in later], ref[:3])
    assert [r.seqs[0].completion().cached_tokens for r in later] == [3, 12, 16]  # grouped [3, 12], [16]


def test_grouping_keeps_hits_apart_from_a_long_uncached_prompt(family, text):
    engine = make_engine(family)
    seqs = [engine.submit([ids], greedy(), lambda e: None).seqs[0] for ids in (text[:22], text[:30], text[5:35])]
    groups = prefill_groups(seqs, 2048, {seqs[0]: 20, seqs[1]: 28})
    assert groups == [[seqs[0], seqs[1]], [seqs[2]]]
    assert prefill_groups(seqs, 2048) == [seqs]  # without hits, as the budget allows


def test_prompt_equal_to_a_cached_prefix_runs_its_last_token(family, text):
    cache = PrefixCache(1 << 20, BLOCK)
    engine = make_engine(family, cache)
    run(engine, [text[:12]])
    got = run(engine, [text[:12]]) + run(engine, [text[:8]])
    assert [c[0].cached_tokens for c in got] == [11, 7]
    assert_same(got, alone(family, [text[:12], text[:8]]))


def test_num_return_sequences_share_the_hit(family, text):
    params = GenerationParams(max_new_tokens=6, temperature=0.8, seed=3, num_return_sequences=3, logprobs=0,
                              stop_at_eos=False)
    engine = make_engine(family, PrefixCache(1 << 20, BLOCK))
    run(engine, [text[:20]], greedy(1))
    got = run(engine, [text[:14] + text[36:39]], params)
    assert [c.cached_tokens for c in got[0]] == [12, 12, 12]
    assert_same(got, alone(family, [text[:14] + text[36:39]], params))


def test_prompt_logprobs_requests_run_every_token(family, text):
    """A request with prompt logprobs looks nothing up (it needs every position), beside one that does."""
    cache = PrefixCache(1 << 20, BLOCK)
    engine = make_engine(family, cache)
    run(engine, [text[:24]], greedy(1))
    queried = engine.stats.prefix_queried_tokens
    with_logprobs = engine.submit([text[:20] + [text[30]]], greedy(3), lambda e: None, prompt_logprobs=2)
    plain = engine.submit([text[:16] + [text[31]]], greedy(3), lambda e: None)
    engine.run_until_done()
    ref_eng = make_engine(family)
    ref = ref_eng.submit([text[:20] + [text[30]]], greedy(3), lambda e: None, prompt_logprobs=2)
    ref_eng.run_until_done()
    got_seq, ref_seq = with_logprobs.seqs[0], ref.seqs[0]
    assert got_seq.cached_tokens == 0 and plain.seqs[0].cached_tokens == 16
    assert got_seq.token_ids == ref_seq.token_ids
    assert [lp for lp, _ in got_seq.prompt_logprobs] == pytest.approx([lp for lp, _ in ref_seq.prompt_logprobs],
                                                                      abs=1e-5)
    assert engine.stats.prefix_queried_tokens == queried + 17  # the plain prompt only


def test_stats_and_cached_tokens(family, text):
    """Counters on the cache (shared by two engines) and each engine; Completion.cached_tokens."""
    cache = PrefixCache(1 << 20, BLOCK)
    first, second = make_engine(family, cache), make_engine(family, cache)
    assert cache.hit_rate == 0.0
    run(first, [text[:10]])
    (done,), = run(second, [text[:9] + [text[20]]])
    assert done.cached_tokens == 8
    assert (first.stats.prefix_queried_tokens, first.stats.prefix_hit_tokens) == (10, 0)
    assert (second.stats.prefix_queried_tokens, second.stats.prefix_hit_tokens) == (10, 8)
    assert (cache.queried_tokens, cache.hit_tokens) == (20, 8)
    assert cache.hit_rate == pytest.approx(0.4)
    assert make_engine(family).stats.prefix_queried_tokens == 0


def test_clear_forgets_every_block(family, text):
    cache = PrefixCache(1 << 20, BLOCK)
    engine = make_engine(family, cache)
    run(engine, [text[:12]])
    assert len(cache) == 3 and cache.used_bytes > 0
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0
    assert run(engine, [text[:12]])[0][0].cached_tokens == 0


def test_blocks_hold_the_models_keys_and_values(family, text):
    cache = PrefixCache(1 << 20, BLOCK)
    run(make_engine(family, cache), [text[:9]])
    cfg, weight = family.model.config, family.model.wte.weight
    per_block = 2 * cfg.n_layers * cfg.n_heads * BLOCK * cfg.head_dim * weight.element_size()
    assert cache.used_bytes == 2 * per_block
    hit = cache.lookup(text[:9])
    assert hit.tokens == 8 and hit.keys_values(8).shape == (2, cfg.n_layers, cfg.n_heads, 8, cfg.head_dim)
    assert all(b.dtype == weight.dtype and b.device == weight.device for b in hit.blocks)


def kv(tokens: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns keys and values (layers 2, heads 2, tokens, head_dim 4) in fp32: 512 bytes per block of 4."""
    k = torch.arange(2 * 2 * tokens * 4, dtype=torch.float32).view(2, 2, tokens, 4) + fill
    return k, -k


BLOCK_BYTES = 2 * 2 * 2 * BLOCK * 4 * 4


def test_adapters_are_keyed_apart():
    cache = PrefixCache(1 << 20, BLOCK)
    cache.store(list(range(8)), "one", *kv(8))
    cache.store(list(range(8)), None, *kv(8, fill=0.5))
    assert cache.lookup(list(range(9)), "two") is None
    hit, base = cache.lookup(list(range(9)), "one"), cache.lookup(list(range(9)))
    assert hit.tokens == base.tokens == 8
    torch.testing.assert_close(hit.keys_values(8), torch.stack(kv(8)), rtol=0, atol=0)
    torch.testing.assert_close(base.keys_values(6), torch.stack(kv(8, fill=0.5))[:, :, :, :6], rtol=0, atol=0)


def test_lookup_takes_the_longest_chain_of_full_blocks():
    cache = PrefixCache(1 << 20, BLOCK)
    assert cache.store(list(range(10)), None, *kv(10)) == 2  # the last 2 tokens are no full block
    assert cache.store(list(range(12)), None, *kv(12)) == 1  # the first two were there
    assert cache.lookup(list(range(20))).tokens == 12
    assert cache.lookup(list(range(6)) + [99] * 6).tokens == 4
    assert cache.lookup([1] + list(range(1, 12))) is None  # a different first block: no match after it either
    assert cache.lookup([0]) is None and cache.lookup(list(range(4))).tokens == 3


def test_lru_eviction_stays_within_max_bytes():
    cache = PrefixCache(3 * BLOCK_BYTES, BLOCK)
    a, b, c = list(range(8)), list(range(100, 108)), list(range(200, 208))
    cache.store(a, None, *kv(8))
    cache.store(b, None, *kv(8))  # 4 blocks > 3: a's last block goes (a leaf, before its parent)
    assert cache.used_bytes == 3 * BLOCK_BYTES <= cache.max_bytes
    assert cache.lookup(a + [0]).tokens == 4 and cache.lookup(b + [0]).tokens == 8
    cache.lookup(a + [0])  # a's first block is now the most recently used
    cache.store(c, None, *kv(8))  # b's blocks go, last first
    assert cache.lookup(b + [0]) is None
    assert cache.lookup(a + [0]).tokens == 4 and cache.lookup(c + [0]).tokens == 8
    assert len(cache) * BLOCK_BYTES == cache.used_bytes
    tiny = PrefixCache(BLOCK_BYTES - 1, BLOCK)
    assert tiny.store(a, None, *kv(8)) == 0 and tiny.used_bytes == 0  # no block fits


def test_a_chain_longer_than_the_cache_keeps_its_start():
    """Storing more blocks than fit never evicts the chain being stored: it stops where it runs out."""
    cache = PrefixCache(2 * BLOCK_BYTES, BLOCK)
    assert cache.store(list(range(16)), None, *kv(16)) == 2
    assert cache.lookup(list(range(17))).tokens == 8


def test_megabytes_and_default():
    assert PrefixCache.megabytes(0) is None
    cache = PrefixCache.megabytes(1.5)
    assert cache.max_bytes == 3 * 2**19 and cache.block_size == 16
    assert DEFAULT_PREFIX_CACHE_MB > 0


def test_shared_between_threads(family, text):
    """One cache serves an engine running on its own thread and private engines on other threads."""
    cache = PrefixCache(1 << 20, BLOCK)
    server = make_engine(family, cache).start()
    prompts = [text[:9 + i] + text[30 + i : 32 + i] for i in range(4)]
    ref = alone(family, prompts)
    out: dict[int, list] = {}

    def work(i):
        out[i] = server.generate([prompts[i]], greedy()) if i % 2 else run(make_engine(family, cache), [prompts[i]])[0]

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.shutdown()
    assert_same([out[i] for i in range(4)], ref)


# ---- scoring (the tasks' continuation log-likelihoods: classify's few-shot prompts) ----

from neoj.tasks import LocalRunner, classify, continuation_logprobs  # noqa: E402
from neoj.tasks.classify import classification_prompt  # noqa: E402
from neoj.tasks.prompts import Prompts  # noqa: E402

EXAMPLES = [("I loved it, a wonderful evening.", "positive"), ("Cold food and a rude waiter.", "negative"),
            ("Best concert of the year!", "positive")]
REVIEWS = ["Great service and tasty food.", "Never going back there.", "It was fine, I suppose.",
           "The film was far too long and boring."]


def scores(family, monkeypatch, cache, pairs, **kw) -> list[float]:
    """Returns continuation_logprobs of pairs on family's model with lm.prefix_cache set to `cache`."""
    monkeypatch.setattr(family.lm, "prefix_cache", cache)
    return continuation_logprobs(LocalRunner(family.lm), pairs, **kw)


@pytest.mark.parametrize("shared", [WINDOW - 2, WINDOW + 5])
def test_continuation_logprobs_reuse_cached_prefixes(family, text, shared, monkeypatch):
    """Contexts sharing `shared` tokens (shorter and longer than the local window), continuations of 1-3 tokens:
    within 1e-5 of scoring without a cache, the first call storing blocks and the second reusing them."""
    pairs = [(text[:shared] + text[30 : 30 + i], text[36 : 37 + i % 3]) for i in range(4)]
    ref = scores(family, monkeypatch, None, pairs)
    cache = PrefixCache(1 << 20, BLOCK)
    first = scores(family, monkeypatch, cache, pairs)
    assert cache.hit_tokens == 0 and cache.queried_tokens == sum(len(c) + len(x) for c, x in pairs)
    assert len(cache) > 0
    second = scores(family, monkeypatch, cache, pairs)
    # Each context's own blocks are cached now; the group reuses the fewest any row has (capped at len - 1).
    start = min(min(len(c) // BLOCK * BLOCK, len(c) - 1) for c, _ in pairs)
    assert cache.hit_tokens == len(pairs) * start > 0
    torch.testing.assert_close(torch.tensor(first), torch.tensor(ref), **TOL)
    torch.testing.assert_close(torch.tensor(second), torch.tensor(ref), **TOL)


def test_scoring_groups_reuse_what_earlier_groups_stored(family, text, monkeypatch):
    """Rows in several groups of one call, with different cached lengths (one group reuses the fewest, running
    the rest again), and a context ending exactly at a block's end (its last token still runs)."""
    pairs = [(text[:30] + [text[39]], text[31:33]), (text[:13] + text[33:37], [text[37]]),
             (text[:6] + text[31:33], text[33:36]), (text[:24], text[24:26]), (text[32:37], [text[5]])]
    ref = scores(family, monkeypatch, None, pairs)
    cache = PrefixCache(1 << 20, BLOCK)
    scores(family, monkeypatch, cache, [(text[:32], [text[32]])])  # stores text[:32] in 8 blocks
    # One row per group (shortest first): each reuses its own hit, 0, 4, 12, 23 (of 24: capped) and 28 tokens,
    # then stores its context; then all rows in one group, each holding its whole context but the last token
    # (4, 7, 16, 23, 28): the group reuses 4 tokens of each and runs the rest again.
    for batch_tokens, hits in ((1, 67), (10_000, 67 + 5 * 4)):
        got = scores(family, monkeypatch, cache, pairs, batch_tokens=batch_tokens)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), **TOL)
        assert cache.hit_tokens == hits


@pytest.mark.parametrize("examples", [EXAMPLES[:1], EXAMPLES])
def test_classify_with_examples_equals_it_without_a_prefix_cache(family, examples, monkeypatch):
    """Few-shot classification: label probabilities within 1e-5 of the uncached ones; the second batch reuses
    the few-shot prompt the first stored."""
    labels = ("positive", "negative", "very mixed feelings")
    monkeypatch.setattr(family.lm, "prefix_cache", None)
    ref = classify(family.lm, REVIEWS, labels, examples=examples)
    cache = PrefixCache(1 << 20, BLOCK)
    monkeypatch.setattr(family.lm, "prefix_cache", cache)
    got = classify(family.lm, REVIEWS[:2], labels, examples=examples)
    assert cache.hit_tokens == 0
    got += classify(family.lm, REVIEWS[2:], labels, examples=examples, batch_size=1)
    tok = family.lm.tokenizer
    contexts = [tok.encode(classification_prompt(Prompts(), t, labels, examples)) for t in REVIEWS]
    common = next(i for i in range(min(map(len, contexts)) + 1)
                  if i == min(map(len, contexts)) or len({c[i] for c in contexts}) > 1)
    assert common > WINDOW
    assert cache.hit_tokens >= 2 * len(labels) * (common // BLOCK * BLOCK) > 0  # the last two reviews' rows
    for g, r in zip(got, ref, strict=True):
        assert g.label == r.label
        for x in labels:
            assert g.probabilities[x] == pytest.approx(r.probabilities[x], abs=1e-5)
            assert g.logprobs[x] == pytest.approx(r.logprobs[x], abs=1e-5)
