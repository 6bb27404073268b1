"""Decoding: KV cache vs recompute, batching, sampling knobs, stop strings, logprobs, scoring, streaming, limits."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, SHORT_PROMPT, WINDOW, hf_logits, left_pad, neoj_logits

import neoj
from neoj.generate import generate_batch
from neoj.kv_cache import KVCache
from neoj.model import positions_from_valid
from neoj.sampling import GenerationParams

ATOL = 1e-4


def greedy(n: int, **kw) -> GenerationParams:
    """Returns greedy params for n tokens that do not stop at EOS."""
    return GenerationParams(max_new_tokens=n, temperature=0, stop_at_eos=False, **kw)


@torch.inference_mode()
def cached_logits(model, prompts: list[list[int]], forced: list[list[int]], chunk: int = 0) -> torch.Tensor:
    """Returns (B, S+1, V) next-token logits from the KV-cache path, teacher-forcing `forced` (S tokens a row).

    Step 0 is the prefill. With chunk > 0 the first `chunk` forced tokens are appended in one call (a
    multi-token write into a non-empty cache) and their last logits stand for all of them.
    """
    B, S = len(prompts), len(forced[0])
    ids, valid = left_pad(prompts)
    positions = positions_from_valid(valid)
    cache = KVCache.for_model(model, B, ids.shape[1] + S)
    hidden = model(ids, positions, cache, None if bool(valid.all()) else valid)
    out = [model.logits(hidden[:, -1])]
    nxt = positions[:, -1:] + 1
    forced_t = torch.tensor(forced)
    s = 0
    if chunk:
        block = forced_t[:, :chunk]
        hidden = model(block, nxt + torch.arange(chunk), cache)
        out += [model.logits(hidden[:, i]) for i in range(chunk)]
        nxt, s = nxt + chunk, chunk
    for s in range(s, S):
        hidden = model(forced_t[:, s : s + 1], nxt, cache)
        out.append(model.logits(hidden[:, -1]))
        nxt = nxt + 1
    return torch.stack(out, dim=1)


def recomputed_logits(lm, prompt: list[int], forced: list[int]) -> torch.Tensor:
    """Returns (S+1, V) logits for each prefix, from one no-cache forward over the whole sequence."""
    return neoj_logits(lm, prompt + forced)[len(prompt) - 1 :]


# ---------------------------------------------------------------------------------------------
# KV cache and batching


@pytest.mark.parametrize("name", ["neo", "neo_local3", "neo_local_global", "gptj"])
@pytest.mark.parametrize("prompt", [SHORT_PROMPT, PROMPTS[0]], ids=["short", "long"])
def test_cached_decoding_equals_recompute(zoo, tokenizer, name, prompt):
    tiny = zoo[name]
    ids = tokenizer.encode(prompt)
    forced = tokenizer.encode(PROMPTS[1])[: 3 * WINDOW]  # decoding runs well past the window
    got = cached_logits(tiny.model, [ids], [forced])[0]
    ref = recomputed_logits(tiny.lm, ids, forced)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, hf_logits(tiny.hf, ids + forced)[len(ids) - 1 :], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_multi_token_append_to_cache_equals_recompute(zoo, tokenizer, name):
    tiny = zoo[name]
    ids = tokenizer.encode(SHORT_PROMPT)
    forced = tokenizer.encode(PROMPTS[2])[: 2 * WINDOW]
    got = cached_logits(tiny.model, [ids], [forced], chunk=WINDOW + 3)[0]
    torch.testing.assert_close(got, recomputed_logits(tiny.lm, ids, forced), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["neo", "neo_local3", "gptj"])
def test_batched_left_padded_cache_equals_each_row_alone(zoo, tokenizer, name):
    tiny = zoo[name]
    prompts = [tokenizer.encode(SHORT_PROMPT), tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[2])[:13]]
    assert len({len(p) for p in prompts}) == 3
    forced_all = tokenizer.encode(PROMPTS[1])
    forced = [forced_all[i : i + 2 * WINDOW] for i in range(3)]
    got = cached_logits(tiny.model, prompts, forced)
    for row, (p, f) in enumerate(zip(prompts, forced)):
        torch.testing.assert_close(got[row], recomputed_logits(tiny.lm, p, f), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["neo", "gptj"])
@torch.inference_mode()
def test_padded_forward_without_cache_equals_each_row_alone(zoo, tokenizer, name):
    tiny = zoo[name]
    prompts = [tokenizer.encode(p) for p in (SHORT_PROMPT, PROMPTS[0], PROMPTS[1])]
    ids, valid = left_pad(prompts)
    logits = tiny.model.logits(tiny.model(ids, positions_from_valid(valid), key_valid=valid))
    for row, p in enumerate(prompts):
        torch.testing.assert_close(logits[row, ids.shape[1] - len(p):], neoj_logits(tiny.lm, p), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_batched_greedy_equals_unbatched(zoo, tokenizer, name):
    tiny = zoo[name]
    prompts = [tokenizer.encode(p) for p in (SHORT_PROMPT, PROMPTS[0], PROMPTS[2])]
    params = greedy(24)
    batched = generate_batch(tiny.model, tiny.lm.tokenizer, prompts, params)
    for i, p in enumerate(prompts):
        [alone] = generate_batch(tiny.model, tiny.lm.tokenizer, [p], params)
        assert batched[i].token_ids == alone.token_ids
        assert batched[i].text == alone.text
        assert batched[i].prompt_index == i


# ---------------------------------------------------------------------------------------------
# Sampling


def test_same_seed_same_text_and_different_seeds_differ(neo):
    opts = dict(max_new_tokens=16, temperature=1.0, seed=7, stop_at_eos=False)
    first = neo.lm.complete(PROMPTS[0], **opts)[0]
    again = neo.lm.complete(PROMPTS[0], **opts)[0]
    other = neo.lm.complete(PROMPTS[0], **{**opts, "seed": 8})[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids
    assert first.token_ids != greedy_ids(neo, PROMPTS[0], 16)  # it really sampled


def greedy_ids(tiny, prompt: str, n: int) -> list[int]:
    """Returns neoj's greedy continuation of `prompt`."""
    return tiny.lm.complete(prompt, max_new_tokens=n, temperature=0, stop_at_eos=False)[0].token_ids


def test_seeded_row_does_not_depend_on_its_batch_mates(neo):
    opts = dict(max_new_tokens=12, temperature=1.0, seed=3, stop_at_eos=False)
    alone = neo.lm.complete(PROMPTS[1], **opts)[0]
    batched = neo.lm.complete([PROMPTS[0], PROMPTS[1]], **opts)
    assert batched[1].token_ids == alone.token_ids


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_top_k_1_equals_greedy(zoo, name):
    tiny = zoo[name]
    sampled = tiny.lm.complete(PROMPTS[2], max_new_tokens=24, temperature=1.5, top_k=1, seed=1, stop_at_eos=False)
    assert sampled[0].token_ids == greedy_ids(tiny, PROMPTS[2], 24)


def test_num_return_sequences(neo):
    opts = dict(max_new_tokens=10, temperature=1.0, seed=11, stop_at_eos=False, num_return_sequences=3)
    completions = neo.lm.complete([PROMPTS[0], SHORT_PROMPT], **opts)
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    assert all(len(c.token_ids) == 10 for c in completions)
    assert len({tuple(c.token_ids) for c in completions[:3]}) == 3
    texts = neo.lm.generate([PROMPTS[0], SHORT_PROMPT], **opts)
    assert texts == [[c.text for c in completions[:3]], [c.text for c in completions[3:]]]
    assert neo.lm.generate(SHORT_PROMPT, **opts) == texts[1]


def test_repetition_penalty_counts_generated_tokens(neo):
    """Greedy decoding with the penalty equals transformers' generate with the same penalty."""
    ids = neo.lm.tokenizer.encode(PROMPTS[0])
    got = neo.lm.complete(PROMPTS[0], max_new_tokens=24, temperature=0, repetition_penalty=1.5,
                          stop_at_eos=False)[0].token_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = neo.hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24,
                              repetition_penalty=1.5)[0, len(ids):].tolist()
    assert got == ref
    assert got != greedy_ids(neo, PROMPTS[0], 24)  # the penalty changed something


# ---------------------------------------------------------------------------------------------
# Stop strings, logprobs, scoring, streaming


def test_stop_string_spanning_several_tokens(neo, tokenizer):
    full = neo.lm.complete(PROMPTS[1], max_new_tokens=32, temperature=0, stop_at_eos=False)[0]
    ids = full.token_ids
    start, end = len(tokenizer.decode(ids[:6])), len(tokenizer.decode(ids[:9]))
    assert tokenizer.decode(ids[:9]) == full.text[:end]
    stop = full.text[start + 1 : end - 1]  # starts inside token 6, ends inside token 8
    assert len(stop) >= 3 and len(tokenizer.encode(stop)) > 1
    [c] = neo.lm.complete(PROMPTS[1], max_new_tokens=32, temperature=0, stop_at_eos=False, stop=[stop])
    assert c.text == full.text[: full.text.find(stop)]
    assert stop not in c.text
    assert c.finish_reason == "stop"
    assert len(c.token_ids) == 9  # generation ended on the token completing the stop string
    assert "".join(neo.lm.stream(PROMPTS[1], max_new_tokens=32, temperature=0, stop_at_eos=False,
                                 stop=stop)) == c.text


def test_stop_string_never_seen_runs_to_length(neo):
    [c] = neo.lm.complete(PROMPTS[1], max_new_tokens=12, temperature=0, stop=["\x00never\x00"], stop_at_eos=False)
    [plain] = neo.lm.complete(PROMPTS[1], max_new_tokens=12, temperature=0, stop_at_eos=False)
    assert (c.text, c.finish_reason) == (plain.text, "length")


@pytest.mark.parametrize("name", ["neo", "gptj"])
@pytest.mark.parametrize("temperature", [0, 0.7])
def test_logprobs_equal_log_softmax_of_reference_logits(zoo, tokenizer, name, temperature):
    tiny = zoo[name]
    ids = tokenizer.encode(PROMPTS[0])
    [c] = tiny.lm.complete(PROMPTS[0], max_new_tokens=8, temperature=temperature, seed=5, logprobs=3,
                           stop_at_eos=False)
    ref = hf_logits(tiny.hf, ids + c.token_ids)[len(ids) - 1 : -1, :50257]  # padded GPT-J rows are never chosen
    logp = torch.log_softmax(ref, dim=-1)
    expected = logp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=ATOL, rtol=0)
    assert len(c.top_logprobs) == 8
    for step, top in enumerate(c.top_logprobs):
        values, indices = logp[step].topk(3)
        assert list(top) == indices.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_score_total_equals_reference(zoo, tokenizer, name):
    tiny = zoo[name]
    text = PROMPTS[0] + PROMPTS[1]
    ids = tokenizer.encode(text)
    score = tiny.lm.score(text)
    logp = torch.log_softmax(hf_logits(tiny.hf, ids), dim=-1)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    assert score.token_ids == ids
    torch.testing.assert_close(torch.tensor(score.token_logprobs), expected, atol=ATOL, rtol=0)
    assert score.total == pytest.approx(float(expected.sum()), abs=1e-3)
    assert score.perplexity == pytest.approx(float(torch.exp(-expected.mean())), rel=1e-4)


@pytest.mark.parametrize("opts", [
    dict(temperature=0, stop_at_eos=False),
    dict(temperature=0.9, top_p=0.9, seed=4, stop_at_eos=False),
    dict(temperature=1.0, seed=2),
], ids=["greedy", "top_p", "sampled"])
def test_stream_concatenates_to_generate(family, opts):
    pieces = list(family.lm.stream(PROMPTS[2], max_new_tokens=40, **opts))
    assert len(pieces) > 1
    assert "".join(pieces) == family.lm.generate(PROMPTS[2], max_new_tokens=40, **opts)


# ---------------------------------------------------------------------------------------------
# Context policy and parameter validation


def test_prompt_too_long_for_the_context(zoo, tokenizer):
    lm = zoo["neo_ctx64"].lm
    ids = tokenizer.encode(" ".join(PROMPTS))[:50]
    with pytest.raises(neoj.ContextLengthError) as info:
        generate_batch(lm.model, lm.tokenizer, [ids], greedy(20))
    message = str(info.value)
    assert "50" in message and "20" in message and "64" in message
    assert (info.value.prompt_tokens, info.value.limit) == (50, 64)
    with pytest.raises(neoj.ContextLengthError, match="64"):
        lm.complete("hi", max_new_tokens=64)


def test_truncate_keeps_the_last_tokens(zoo, tokenizer):
    lm = zoo["neo_ctx64"].lm
    ids = tokenizer.encode(" ".join(PROMPTS))[:50]
    [cut] = generate_batch(lm.model, lm.tokenizer, [ids], greedy(20, truncate=True))
    [tail] = generate_batch(lm.model, lm.tokenizer, [ids[-44:]], greedy(20))
    assert cut.prompt_tokens == 44
    assert cut.token_ids == tail.token_ids and len(cut.token_ids) == 20


def test_score_too_long_raises(zoo, tokenizer):
    lm = zoo["neo_ctx64"].lm
    with pytest.raises(neoj.ContextLengthError, match="64"):
        lm.score(" ".join(PROMPTS))


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("temperature", -0.5), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("num_return_sequences", 0), ("logprobs", 21),
])
def test_bad_params_name_the_field(neo, field, value):
    with pytest.raises(neoj.GenerationError, match=field):
        neo.lm.complete(SHORT_PROMPT, **{field: value})
    with pytest.raises(neoj.GenerationError, match=field):
        GenerationParams(**{field: value}).validated()


def test_bad_stop_and_unknown_option(neo):
    with pytest.raises(neoj.GenerationError, match="stop"):
        neo.lm.complete(SHORT_PROMPT, stop=[""])
    with pytest.raises(neoj.GenerationError, match="temprature"):
        neo.lm.complete(SHORT_PROMPT, temprature=0.5)
