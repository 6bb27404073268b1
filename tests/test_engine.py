"""The continuous-batching engine: rows joining and leaving a running batch give what each gives alone."""

import queue
import threading
import time

import pytest
import torch

import neoj
from neoj.config import from_hf_dict
from neoj.engine import BatchCache, Engine, QueueFull, admission
from neoj.errors import ContextLengthError, GenerationError
from neoj.kv_cache import KVCache
from neoj.sampling import GenerationParams

NEO = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 128, "hidden_size": 32,
       "num_layers": 4, "num_heads": 4, "attention_types": [[["global", "local"], 2]], "window_size": 8}
GPTJ = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 128, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "rotary_dim": 4, "tie_word_embeddings": False}

PROMPTS = ["The cat", "Once upon a time there was a very long story that went on and on, and on",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15", "Hello", "A", "In the beginning was the word, and the"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["neo", "gptj"])
def lm(request):
    torch.manual_seed(0)
    return neoj.from_config(from_hf_dict(NEO if request.param == "neo" else GPTJ), dtype="float32", device="cpu")


@pytest.fixture
def engine(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=8, max_queue=64).start()
    yield eng
    eng.shutdown()


def greedy(n=24, **kw):
    return GenerationParams(max_new_tokens=n, temperature=0, stop_at_eos=False, **kw)


def run_concurrently(eng, jobs):
    """Submits every (ids, params) at once from threads; returns their Completions in order."""
    out = [None] * len(jobs)

    def work(i):
        out[i] = eng.generate([jobs[i][0]], jobs[i][1])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_alone_matches_library_generate(lm, engine):
    for prompt in PROMPTS:
        ref = lm.complete(prompt, max_new_tokens=24, temperature=0, stop_at_eos=False)[0]
        got = engine.generate([lm.tokenizer.encode(prompt)], greedy())[0]
        assert got.token_ids == ref.token_ids and got.text == ref.text


def test_concurrent_greedy_equals_alone(lm, engine):
    # Different prompt and output lengths: rows join with longer and shorter prompts than the batch
    # (shifting it right), leave at different steps, and run past the local window.
    jobs = [(lm.tokenizer.encode(PROMPTS[i % len(PROMPTS)] + " x" * i), greedy(10 + 3 * i)) for i in range(20)]
    alone = [engine.generate([ids], p)[0].token_ids for ids, p in jobs]
    together = [c[0].token_ids for c in run_concurrently(engine, jobs)]
    assert together == alone
    assert engine.stats.steps > 0 and engine.stats.finished["length"] == 2 * len(jobs)


def test_requests_admitted_together_are_prefilled_together(lm, monkeypatch):
    # Queued before the model thread starts, so one admission round takes them all: the new prompts
    # (of different lengths, so left-padded) share one prefill forward, and each row still gets what it
    # gets alone, prompt log-probabilities and copies of a prompt included.
    jobs = [(lm.tokenizer.encode(p), greedy(12 + i)) for i, p in enumerate(PROMPTS)]
    jobs.append((lm.tokenizer.encode(PROMPTS[1]), GenerationParams(max_new_tokens=10, temperature=0.9, seed=5,
                                                                   num_return_sequences=2)))
    ref = Engine(lm.model, lm.tokenizer, max_batch=8).start()
    try:
        alone = [[c.token_ids for c in ref.generate([ids], p)] for ids, p in jobs]
        scored = ref.submit([jobs[5][0]], GenerationParams(max_new_tokens=0), lambda e: None, prompt_logprobs=2)
        while not scored.done:
            time.sleep(0.01)
    finally:
        ref.shutdown()
    eng = Engine(lm.model, lm.tokenizer, max_batch=16)
    groups = []
    real_prefill = admission.prefill
    monkeypatch.setattr(admission, "prefill", lambda model, seqs, *rest: (groups.append(len(seqs)),
                                                                          real_prefill(model, seqs, *rest))[1])
    events = queue.Queue()
    reqs = [eng.submit([ids], p, events.put) for ids, p in jobs]
    reqs.append(eng.submit([jobs[5][0]], GenerationParams(max_new_tokens=0), events.put, prompt_logprobs=2))
    eng.start()
    try:
        deadline = time.monotonic() + 60
        while not all(r.done for r in reqs) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        eng.shutdown()
    assert [[s.token_ids for s in r.seqs] for r in reqs[:-1]] == alone
    assert groups == [len(jobs) + 1]
    got, want = reqs[-1].seqs[0].prompt_logprobs, scored.seqs[0].prompt_logprobs
    assert [lp for lp, _ in got[1:]] == pytest.approx([lp for lp, _ in want[1:]], abs=1e-5)
    assert [list(top) for _, top in got[1:]] == [list(top) for _, top in want[1:]]


def test_staggered_arrivals_compact_and_grow_the_cache(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=3).start()
    try:
        jobs = [(lm.tokenizer.encode(PROMPTS[i % 6]), greedy(60 + 7 * (i % 4))) for i in range(9)]
        alone = [eng.generate([ids], p)[0].token_ids for ids, p in jobs]
        results = [None] * len(jobs)

        def work(i):
            time.sleep(0.01 * i)
            results[i] = eng.generate([jobs[i][0]], jobs[i][1])[0].token_ids

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == alone
    finally:
        eng.shutdown()


def test_seeded_sampling_with_penalties_matches_library(lm, engine):
    opts = dict(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3,
                presence_penalty=0.5, frequency_penalty=0.2, seed=7, num_return_sequences=3)
    ref = lm.complete(PROMPTS[1], **opts)
    got = engine.generate([lm.tokenizer.encode(PROMPTS[1])], GenerationParams(**opts))
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert len({tuple(c.token_ids) for c in got}) > 1  # each copy has its own generator
    # Alongside a greedy row and rows with other parameters, the seeded rows are unchanged.
    mixed = run_concurrently(engine, [(lm.tokenizer.encode(PROMPTS[1]), GenerationParams(**opts)),
                                      (lm.tokenizer.encode(PROMPTS[0]), greedy(30)),
                                      (lm.tokenizer.encode(PROMPTS[2]), GenerationParams(temperature=1.5, top_k=3))])
    assert [c.token_ids for c in mixed[0]] == [c.token_ids for c in ref]


def test_logprobs_and_prompt_logprobs(lm, engine):
    ids = lm.tokenizer.encode(PROMPTS[5])
    ref = lm.complete(PROMPTS[5], max_new_tokens=6, temperature=0, logprobs=3)[0]
    got = engine.generate([ids], GenerationParams(max_new_tokens=6, temperature=0, logprobs=3), prompt_logprobs=2)
    c = got[0]
    assert c.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    assert [list(t) for t in c.top_logprobs] == [list(t) for t in ref.top_logprobs]
    # Scoring only (max_new_tokens=0, as lm-eval does): prompt logprobs equal LanguageModel.score.
    req_events = queue.Queue()
    req = engine.submit([ids], GenerationParams(max_new_tokens=0), req_events.put, prompt_logprobs=2)
    ev = req_events.get(timeout=30)
    assert ev.finish_reason == "length" and ev.text == ""
    plp = req.seqs[0].prompt_logprobs
    assert plp[0] == (None, None) and len(plp) == len(ids)
    assert [lp for lp, _ in plp[1:]] == pytest.approx(lm.score(PROMPTS[5]).token_logprobs, abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= lp - 1e-6 for lp, top in plp[1:])


def test_stop_strings_eos_and_streaming_events(lm, engine):
    ids = lm.tokenizer.encode(PROMPTS[0])
    full = engine.generate([ids], greedy(30))[0].text
    stop = full[5:8]
    events = queue.Queue()
    engine.submit([ids], greedy(30, stop=[stop]), events.put)
    pieces = []
    while True:
        ev = events.get(timeout=30)
        pieces.append(ev.text)
        if ev.finish_reason:
            break
    assert ev.finish_reason == "stop"
    assert "".join(pieces) == full[: full.find(stop)]
    eos = lm.tokenizer.eos_token_id
    c = engine.generate([ids], GenerationParams(max_new_tokens=30, temperature=0))[0]
    assert eos not in c.token_ids[:-1]


def test_sinks_can_pass_events_on_in_bursts(lm, engine):
    # What the server does: sinks only collect, and the flush after each admission round and decode step
    # hands the burst on; every token arrives, in order, as soon as its step is done.
    collected, bursts = [], []

    def flush():
        bursts.append(list(collected))
        collected.clear()

    engine.on_events(flush)
    req = engine.submit([lm.tokenizer.encode(PROMPTS[0])], greedy(5), collected.append)
    deadline = time.monotonic() + 30
    while not (req.done and bursts and bursts[-1] and bursts[-1][-1].finish_reason) and time.monotonic() < deadline:
        time.sleep(0.01)
    bursts = [b for b in bursts if b]
    assert [len(b) for b in bursts] == [1] * 5
    assert [b[0].token_id for b in bursts] == req.seqs[0].token_ids


def test_cancel_frees_the_row_and_queue_limits(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=1, max_queue=1).start()
    try:
        events = queue.Queue()
        long = eng.submit([lm.tokenizer.encode("a")], greedy(120), events.put)
        events.get(timeout=30)  # running
        waiting = eng.submit([lm.tokenizer.encode("b")], greedy(2), events.put)
        with pytest.raises(QueueFull) as info:
            eng.submit([lm.tokenizer.encode("c")], greedy(2), events.put)
        assert info.value.retry_after >= 1
        eng.cancel(long)
        deadline = time.monotonic() + 30
        while not waiting.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting.done and long.seqs[0].finish_reason == "cancelled"
        assert len(long.seqs[0].token_ids) < 120
        assert eng.stats.finished["cancelled"] == 1 and eng.running == []
    finally:
        eng.shutdown()


def test_long_model_work_runs_in_pieces_between_decode_steps(lm, engine):
    # While a row decodes, a job of pieces runs one piece per round: each piece sees more decode steps done
    # than the one before, so the running row waited for one piece per step, never for the whole job.
    events = queue.Queue()
    req = engine.submit([lm.tokenizer.encode("Hello")], greedy(100), events.put)
    events.get(timeout=30)  # running
    steps = []
    fut = engine.call_pieces([lambda i=i: steps.append(engine.stats.steps) or i * i for i in range(6)])
    assert fut.result(timeout=60) == [i * i for i in range(6)]
    assert all(b > a for a, b in zip(steps, steps[1:])), steps
    assert engine.call(lambda: "one").result(timeout=60) == "one"  # call() runs one function, its own result
    engine.cancel(req)


def test_cancelling_a_job_skips_its_pieces_left_and_errors_reach_the_caller(lm, engine):
    started, gate, ran = threading.Event(), threading.Event(), []
    fut = engine.call_pieces([lambda: (started.set(), gate.wait(30)), lambda: ran.append("second")])
    assert started.wait(30)
    assert fut.cancel()  # the job stays pending until its last piece: cancellable while a piece runs
    gate.set()
    engine.call(lambda: None).result(timeout=30)  # a later job: the cancelled one has had its round
    assert fut.cancelled() and ran == []

    def broken():
        raise ValueError("piece failed")

    with pytest.raises(ValueError, match="piece failed"):
        engine.call_pieces([lambda: 1, broken, lambda: ran.append("after")]).result(timeout=30)
    assert ran == []


def test_max_time_and_bad_input(lm, engine):
    c = engine.generate([lm.tokenizer.encode("x")], greedy(120), max_time=0.02)
    assert len(c[0].token_ids) >= 1
    with pytest.raises(ContextLengthError) as info:
        engine.submit([[1] * 120], greedy(20), print)
    assert info.value.prompt_tokens == 120 and info.value.limit == 128
    truncated = engine.generate([[1] * 120], greedy(20, truncate=True))[0]
    assert truncated.prompt_tokens == 108 and len(truncated.token_ids) == 20
    with pytest.raises(GenerationError):
        engine.submit([[1]], GenerationParams(temperature=-1), print)
    with pytest.raises(GenerationError):
        engine.submit([[60000]], greedy(), print)


def test_batch_cache_splice_and_remove(lm):
    model = lm.model
    cache = BatchCache(model, max_rows=4)

    def solo(p):
        c = KVCache.for_model(model, 1, p)
        c.k.normal_()
        c.v.normal_()
        return c

    a, b = solo(5), solo(9)
    cache.add(a, 5)
    assert cache.length == 5 and cache.starts == [0] and not cache.padded
    cache.add(b, 9)  # longer than the batch: the first row shifts right
    assert cache.length == 9 and cache.starts == [4, 0] and cache.padded
    assert torch.equal(cache.k[:, 0, :, 4:9], a.k[:, 0, :, :5]) and torch.equal(cache.k[:, 1, :, :9], b.k[:, 0])
    assert cache.key_valid[0, :9].tolist() == [False] * 4 + [True] * 5
    cache.remove(1)
    cache.compact()
    assert cache.starts == [0] and cache.length == 5 and torch.equal(cache.k[:, 0, :, :5], a.k[:, 0, :, :5])
    cache.remove(0)
    assert cache.rows == 0 and cache.length == 0


def test_max_queue_counts_only_requests_beyond_free_rows(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=1, max_queue=0).start()
    try:
        assert len(eng.generate([lm.tokenizer.encode("a")], greedy(3))[0].token_ids) == 3
    finally:
        eng.shutdown()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_single_nan_or_inf_logit_ends_the_batch_with_a_clear_error(lm, bad):
    # One bad value among 50k finite logits: the greedy pick alone would not notice it.
    real_logits = lm.model.logits

    def broken(hidden):
        out = real_logits(hidden)
        out[:, 1234] = bad
        return out

    eng = Engine(lm.model, lm.tokenizer, max_batch=4).start()
    try:
        lm.model.logits = broken
        with pytest.raises(GenerationError, match="NaN/inf logits"):
            eng.generate([lm.tokenizer.encode("Hello")], greedy(4))
    finally:
        del lm.model.logits
        eng.shutdown()


# ---- the driver: rounds on the caller's thread, the step variants, errors ----

def drive(eng, jobs):
    """Submits every (ids, params), runs rounds on this thread until done; returns token ids per job."""
    reqs = [eng.submit([ids], p, lambda e: None) for ids, p in jobs]
    eng.run_until_done()
    assert all(r.done for r in reqs) and not eng.has_work
    return [[s.token_ids for s in r.seqs] for r in reqs]


def mixed_jobs(lm):
    """Rows that end at different steps: by length, by a stop string, by EOS-free runs, sampled with a seed."""
    jobs = [(lm.tokenizer.encode(p), greedy(6 + 5 * i)) for i, p in enumerate(PROMPTS)]
    jobs.append((lm.tokenizer.encode(PROMPTS[0]), GenerationParams(max_new_tokens=15, temperature=0.8, seed=2,
                                                                   num_return_sequences=2)))
    jobs.append((lm.tokenizer.encode(PROMPTS[1]), greedy(20, stop=["e"])))
    return jobs


def test_rounds_on_the_callers_thread_equal_the_engine_thread(lm, engine):
    jobs = mixed_jobs(lm)
    threaded = [[c.token_ids for c in engine.generate([ids], p)] for ids, p in jobs]
    assert drive(Engine(lm.model, lm.tokenizer, max_batch=3), jobs) == threaded  # rows join as others leave


def test_a_step_queued_ahead_gives_the_same_tokens(lm):
    # On CUDA the next step is queued before the host reads this one's tokens; rows that end meanwhile drop
    # out of it. The same bookkeeping runs on the CPU when asked, and must not change a token.
    jobs = mixed_jobs(lm)
    plain = drive(Engine(lm.model, lm.tokenizer, max_batch=4), jobs)
    ahead = Engine(lm.model, lm.tokenizer, max_batch=4)
    ahead.batch.run_ahead = True
    assert drive(ahead, jobs) == plain


def test_static_decode_steps_per_batch_layout_equal_eager(lm):
    # The graphed step's static path (fixed shapes, writes at a slot tensor), one step per layout of the
    # batch as rows join and leave, without recording (CPU): the same tokens as the eager step.
    from neoj.cuda_graph import GraphedDecodeStep

    jobs = mixed_jobs(lm)
    made = []

    def static_step(model, cache):
        made.append(cache.layout)
        return GraphedDecodeStep(model, cache, capture=False)

    plain = drive(Engine(lm.model, lm.tokenizer, max_batch=3), jobs)
    assert drive(Engine(lm.model, lm.tokenizer, max_batch=3, make_step=static_step), jobs) == plain
    assert len(set(made)) > 1  # the batch changed layout, and each layout got its own step


def test_without_the_thread_failures_raise(lm):
    real_logits = lm.model.logits

    def broken(hidden):
        out = real_logits(hidden)
        out[:, 7] = float("nan")
        return out

    eng = Engine(lm.model, lm.tokenizer, max_batch=2)
    eng.submit([lm.tokenizer.encode("Hello")], greedy(4), lambda e: None)
    try:
        lm.model.logits = broken
        with pytest.raises(GenerationError, match="NaN/inf logits"):
            eng.run_until_done()
    finally:
        del lm.model.logits
    assert eng.running == [] and eng.cache.rows == 0


def test_a_private_engine_frees_its_cache_without_the_cycle_collector(lm):
    # generate_batch drives an engine of its own; once it returns, nothing may hold that engine's cache in a
    # reference cycle, or its memory stays taken until Python's cycle collector happens to run.
    import gc

    from neoj.generate import generate_batch

    def live_caches():
        return sum(isinstance(o, BatchCache) for o in gc.get_objects())

    gc.collect()
    before = live_caches()
    gc.disable()
    try:
        generate_batch(lm.model, lm.tokenizer, [lm.tokenizer.encode(p) for p in PROMPTS], greedy(8))
        assert live_caches() == before
    finally:
        gc.enable()


# ---- request priority (issue 15) ----

def first_token_order(lm, submissions, max_batch=1, running_first=True):
    """Submits (name, priority) requests to a caller-driven engine whose only row is busy (running_first);
    returns the names in the order their first tokens came."""
    eng = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=16)
    order = []

    def sink_for(name):
        return lambda event: order.append(name) if name not in order else None

    if running_first:
        eng.submit([lm.tokenizer.encode("busy")], greedy(3), sink_for("busy"))
        eng.step()  # it holds the batch's only row: the rest queue behind it
    for name, priority in submissions:
        eng.submit([lm.tokenizer.encode(name)], greedy(2), sink_for(name), priority=priority)
    assert eng.stats.waiting == len(submissions)
    eng.run_until_done()
    return order


def test_lower_priority_values_are_admitted_first(lm):
    order = first_token_order(lm, [("low", 5), ("mid", 0), ("urgent", -3), ("mid2", 0), ("low2", 5), ("high", -1)])
    assert order == ["busy", "urgent", "high", "mid", "mid2", "low", "low2"]


def test_equal_priorities_keep_arrival_order(lm):
    names = [f"r{i}" for i in range(6)]
    assert first_token_order(lm, [(n, 0) for n in names]) == ["busy"] + names
    assert first_token_order(lm, [(n, 7) for n in names], max_batch=2, running_first=False) == names


def test_priority_orders_the_queue_of_the_engine_thread(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=1, max_queue=8).start()
    try:
        events = queue.Queue()
        long = eng.submit([lm.tokenizer.encode("a")], greedy(60), events.put)
        events.get(timeout=30)  # running: the rest wait for its row
        order = []
        reqs = [eng.submit([lm.tokenizer.encode(str(p))], greedy(1), lambda e, p=p: order.append(p), priority=p)
                for p in (3, 1, 2, -5)]
        eng.cancel(long)
        deadline = time.monotonic() + 30
        while not all(r.done for r in reqs) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert order == [-5, 1, 2, 3]
    finally:
        eng.shutdown()


@pytest.mark.parametrize("bad", [1.5, "1", True, None, 2.0])
def test_priority_must_be_an_integer(lm, bad):
    eng = Engine(lm.model, lm.tokenizer, max_batch=1)
    with pytest.raises(GenerationError, match="priority"):
        eng.submit([lm.tokenizer.encode("a")], greedy(1), lambda e: None, priority=bad)
    assert not eng.has_work and eng.stats.requests == 0


def test_a_cancelled_request_leaves_the_priority_queue(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=1, max_queue=8)
    done = []
    eng.submit([lm.tokenizer.encode("busy")], greedy(2), lambda e: None)
    eng.step()
    reqs = {p: eng.submit([lm.tokenizer.encode("x")], greedy(1), lambda e, p=p: done.append(p), priority=p)
            for p in (2, 0, 1)}
    eng.cancel(reqs[0])
    assert eng.stats.waiting == 2
    eng.run_until_done()
    assert done == [1, 2]  # the cancelled one was dropped from the queue before it started: no event


def test_latency_histograms_count_requests_and_tokens(lm):
    """Staggered arrivals into a two-row batch, one request of two sequences: one first-token, queue and e2e
    observation per request, one inter-token observation per token after each sequence's first."""
    eng = Engine(lm.model, lm.tokenizer, max_batch=2, max_queue=16)
    reqs = []
    for i, n in enumerate([3, 1, 6, 2, 4]):
        params = greedy(n, num_return_sequences=2 if i == 2 else 1)
        reqs.append(eng.submit([lm.tokenizer.encode(PROMPTS[i])], params, lambda event: None))
        eng.step()
    eng.run_until_done()
    seqs = [s for r in reqs for s in r.seqs]
    tokens = sum(len(s.token_ids) for s in seqs)
    lat = eng.stats.latency

    def count(timings):
        return sum(timings.snapshot()[0])

    assert count(lat.ttft) == count(lat.e2e) == count(lat.queue) == len(reqs)
    assert count(lat.itl) == tokens - len(seqs) and eng.stats.generated_tokens == tokens
    assert all(total >= 0 for total in (lat.ttft.total, lat.itl.total, lat.e2e.total, lat.queue.total))
