"""The OpenAI API, driven by the official `openai` package against a real server on a loopback port."""

import openai
import pytest
import torch

from neoj.server.chat import TEMPLATES

MODEL = "EleutherAI/gpt-neo-125m"


@pytest.fixture(scope="module")
def server(serve_tiny):
    return serve_tiny(model_id=MODEL)


@pytest.fixture(scope="module")
def lm(server):
    return server.lm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_equals_library_greedy(lm, client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=12, temperature=0)
    ref = lm.complete("Hello world", max_new_tokens=12, temperature=0)[0]
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == 2 and r.usage.completion_tokens == len(ref.token_ids)
    assert r.model == MODEL and r.object == "text_completion"


def test_prompt_lists_n_and_seed(lm, client):
    kw = dict(model="gpt-neo-125m", max_tokens=8, temperature=0.8, n=2, seed=3)  # an alias of the served id
    r = client.completions.create(prompt=["The cat", "A dog"], **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    ref = lm.generate(["The cat", "A dog"], max_new_tokens=8, temperature=0.8, top_p=1.0, num_return_sequences=2,
                      seed=3)
    assert [c.text for c in r.choices] == [t for pair in ref for t in pair]
    again = client.completions.create(prompt=["The cat", "A dog"], **kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    # Token-id prompts (as lm-eval sends) give what their text gives.
    ids = lm.tokenizer.encode("The cat")
    by_ids = client.completions.create(model=MODEL, prompt=[ids], max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="The cat", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_stop_and_streaming(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].choices == []


def test_logprobs_with_echo(lm, client):
    prompt = "The quick brown fox jumps"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    n_prompt = len(lm.tokenizer.encode(prompt))
    assert c.text.startswith(prompt) and len(c.logprobs.tokens) == n_prompt + 3
    assert "".join(c.logprobs.tokens[:n_prompt]) == prompt
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:n_prompt] == pytest.approx(lm.score(prompt).token_logprobs, abs=1e-4)
    assert all(len(top) <= 2 for top in c.logprobs.top_logprobs[1:])
    assert c.logprobs.text_offset[:2] == [0, len(c.logprobs.tokens[0])]
    # Greedy tokens are their own top-1: lm-eval's is_greedy test holds on the generated part.
    for lp, top in zip(c.logprobs.token_logprobs[n_prompt:], c.logprobs.top_logprobs[n_prompt:]):
        assert lp == max(top.values())


def test_echo_with_max_tokens_0_scores_the_prompt(lm, client):
    # lm-eval's local-completions loglikelihood request: token ids, echo, logprobs=1, max_tokens=0.
    text = "Paris is the capital of France"
    ids = lm.tokenizer.encode(text)
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=0, logprobs=1, echo=True, temperature=0)
    c = r.choices[0]
    assert c.text == text and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[1:] == pytest.approx(lm.score(text).token_logprobs, abs=1e-4)
    assert len(c.logprobs.tokens) == len(ids)
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True)
    assert plain.choices[0].text == text and plain.choices[0].logprobs is None


def test_chat_plain_transcript(lm, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    prompt = "You are terse.\n\nUser: Say hi\nAssistant:"
    assert TEMPLATES["plain"].render([(m["role"], m["content"]) for m in messages]) == prompt
    ref = lm.generate(prompt, max_new_tokens=10, temperature=0, stop=["\nUser:"])
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.lstrip()
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == msg.content
    lp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_chat_dolly_template(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a color."}],
                                       max_tokens=4, temperature=0, extra_body={"chat_template": "dolly"})
    assert isinstance(r.choices[0].message.content, str)
    prompt = TEMPLATES["dolly"].render([("user", "Name a color.")])
    assert prompt.endswith("### Instruction:\nName a color.\n\n### Response:\n") and prompt.startswith("Below is")
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"chat_template": "../../etc/passwd"})


def test_models_and_unknown_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve("gpt-neo-125m").id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="/etc/passwd", prompt="x", max_tokens=1)
    assert "not served here" in str(info.value)


def test_embeddings(lm, client):
    r = client.embeddings.create(model=MODEL, input=["hello world", "a cat"])  # the client asks for base64
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == lm.config.hidden_size
    ref = lm.embed(["hello world", "a cat"])
    assert torch.tensor([d.embedding for d in r.data]) == pytest.approx(ref, abs=1e-4)
    floats = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == 2


def test_logit_bias_min_p_typical_p_and_priority(lm, client):
    kw = dict(model=MODEL, prompt="The cat", max_tokens=6, temperature=0)
    forced = client.completions.create(logit_bias={"464": 100}, extra_body={"ignore_eos": True}, **kw)
    assert forced.choices[0].text == lm.tokenizer.decode([464] * 6)  # +100 always wins, as in OpenAI's API
    greedy = lm.complete("The cat", max_new_tokens=6, temperature=0)[0].token_ids
    banned = client.completions.create(logit_bias={str(greedy[0]): -100}, **kw).choices[0].text
    assert banned == lm.generate("The cat", max_new_tokens=6, temperature=0, logit_bias={greedy[0]: -100})
    assert lm.tokenizer.encode(banned)[:1] != greedy[:1]
    sampled = dict(model=MODEL, prompt="The cat", max_tokens=8, temperature=1.0, seed=5)
    for extra in ({"min_p": 0.05}, {"typical_p": 0.5}, {"priority": -3}):
        r = client.completions.create(extra_body=extra, **sampled)
        ref_options = {k: v for k, v in extra.items() if k != "priority"}
        ref = lm.generate("The cat", max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5, **ref_options)
        assert r.choices[0].text == ref, extra


def test_best_of_returns_the_most_likely_of_its_samples(lm, client):
    r = client.completions.create(model=MODEL, prompt=["The cat", "A dog"], max_tokens=6, temperature=1.0, seed=9,
                                  n=2, best_of=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(c.logprobs is None for c in r.choices)
    samples = lm.complete(["The cat", "A dog"], max_new_tokens=6, temperature=1.0, top_p=1.0, seed=9,
                          num_return_sequences=4, logprobs=0)
    for prompt_index in range(2):
        group = [c for c in samples if c.prompt_index == prompt_index]
        best = sorted(group, key=lambda c: -sum(c.logprobs) / len(c.logprobs))[:2]
        assert [c.text for c in r.choices[2 * prompt_index : 2 * prompt_index + 2]] == [c.text for c in best]


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def check_person(text: str) -> None:
    import json

    value = json.loads(text)
    assert set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150 and not isinstance(value["age"], bool)
    assert len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b"}


def test_response_format_json_schema_on_chat_and_completions(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):  # a random model emits garbage unless constrained: every reply must still validate
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                           response_format=fmt, max_tokens=100, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        check_person(r.choices[0].message.content)
    r = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=100, temperature=0.9, n=3, seed=1,
                                  extra_body={"response_format": fmt})
    for choice in r.choices:
        check_person(choice.text)
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                            response_format=fmt, max_tokens=100, temperature=0, stream=True)
    check_person("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_a_schema_the_library_refuses_is_a_400_naming_it(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "two"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], response_format=bad)
    assert "response_format" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"response_format": {"type": "yaml"}})
