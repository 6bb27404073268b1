"""Many LoRA adapters behind one server: each is a model id (OpenAI `model`, TGI `adapter_id`, the HF path), and
requests naming different adapters, sent at once, each get what the merged model gives alone."""

from __future__ import annotations

import concurrent.futures
import copy

import httpx
import openai
import pytest
import torch

import neoj
from neoj.server import run_in_thread

MODEL = "EleutherAI/gpt-neo-125m"
TARGETS = {"story": ["q_proj", "v_proj"], "code": ["c_fc", "out_proj"]}


@pytest.fixture(scope="module")
def adapter_dirs(neo, tmp_path_factory):
    """Returns {name: directory} of PEFT adapters made with peft on the transformers model, B random."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i, (name, targets) in enumerate(TARGETS.items()):
        peft_model = get_peft_model(copy.deepcopy(neo.hf), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        out[name] = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(out[name])
    return out


@pytest.fixture(scope="module")
def server(neo, adapter_dirs):
    lm = neoj.load(neo.path, dtype="float32", device="cpu")
    server = run_in_thread(lm, model_id=MODEL, adapters=adapter_dirs)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(neo, adapter_dirs):
    """Returns {adapter or None: greedy text of PROMPT} from the merged model alone (neoj merge's way)."""
    out = {}
    for name in (None, *TARGETS):
        lm = neoj.load(neo.path, dtype="float32", device="cpu", adapter=adapter_dirs[name] if name else None)
        out[name] = lm.generate(PROMPT, max_new_tokens=10, temperature=0)
    assert len(set(out.values())) == 3  # each adapter changes what the model writes
    return out


PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_each_adapter_with_the_base_as_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL, "story", "code"}
    assert cards["story"].parent == MODEL and cards["code"].parent == MODEL
    assert client.models.retrieve("code").id == "code"
    with pytest.raises(openai.NotFoundError, match="adapters: 'story', 'code'"):
        client.models.retrieve("nope")


def test_concurrent_requests_each_get_their_adapter(client, expected):
    names = [None, "story", "code", "story", None, "code"] * 2

    def ask(name):
        return client.completions.create(model=name or MODEL, prompt=PROMPT, max_tokens=10,
                                         temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(ask, names))
    assert got == [expected[name] for name in names]


def test_tgi_adapter_id_and_the_hf_path(server, expected):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        params = {"max_new_tokens": 10, "adapter_id": "story"}
        body = http.post("/generate", json={"inputs": PROMPT, "parameters": params}).json()
        assert body["generated_text"] == expected["story"]
        path = http.post("/models/code", json={"inputs": PROMPT, "parameters": {
            "max_new_tokens": 10, "do_sample": False, "return_full_text": False}}).json()
        assert path == [{"generated_text": expected["code"]}]
        r = http.post("/v1/embeddings", json={"model": "code", "input": "x"})
        assert r.status_code == 422 and "base model" in r.json()["error"]["message"]
