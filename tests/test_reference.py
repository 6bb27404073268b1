"""neoj against transformers: logits, hidden states and greedy continuations on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EOS, PROMPTS, SHORT_PROMPT, SPECS, WINDOW, hf_logits, neoj_logits
from transformers import AutoModel, GPTJConfig, GPTNeoConfig, GPTNeoForCausalLM

import neoj
from neoj.config import from_hf_dict
from neoj.generate import generate_batch

ATOL = 1e-4  # fp32 against fp32: only summation order differs
LONG_PROMPT = " ".join(PROMPTS)
GREEDY = neoj.GenerationParams(max_new_tokens=64, temperature=0, stop_at_eos=False)


def test_prompts_are_longer_than_the_window(tokenizer):
    assert len(tokenizer.encode(SHORT_PROMPT)) < WINDOW
    assert all(len(tokenizer.encode(p)) > 2 * WINDOW for p in PROMPTS)
    assert len(tokenizer.encode(LONG_PROMPT)) > 8 * WINDOW


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("text", [SHORT_PROMPT, LONG_PROMPT], ids=["short", "long"])
def test_logits_match_transformers(zoo, tokenizer, name, text):
    tiny = zoo[name]
    ids = tokenizer.encode(text)[: tiny.lm.config.n_positions]
    ref = hf_logits(tiny.hf, ids)
    got = neoj_logits(tiny.lm, ids)
    assert got.dtype == torch.float32
    assert got.shape == ref.shape  # GPT-J keeps all 50400 rows, padding included
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, layers", [
    ("neo", ("global", "local", "global", "local")),
    ("neo_local3", ("local", "local", "local")),
    ("neo_global2", ("global", "global")),
    ("neo_local_global", ("local", "global")),
])
def test_attention_pattern_is_expanded_per_layer(zoo, name, layers):
    cfg = zoo[name].lm.config
    assert cfg.attention_layers == layers
    assert cfg.window_size == WINDOW


def test_local_window_changes_the_logits(zoo, tokenizer):
    """Guards the tests above: past the window, the reference's local layers really differ from global."""
    tiny = zoo["neo_local3"]
    config = GPTNeoConfig.from_pretrained(tiny.path)
    config.attention_types, config.attention_layers = [[["global"], 3]], ["global"] * 3
    all_global = GPTNeoForCausalLM.from_pretrained(tiny.path, config=config).eval()
    ids = tokenizer.encode(LONG_PROMPT)
    local, global_ = hf_logits(tiny.hf, ids), hf_logits(all_global, ids)
    torch.testing.assert_close(local[:WINDOW], global_[:WINDOW], atol=ATOL, rtol=0)
    assert (local[WINDOW:] - global_[WINDOW:]).abs().amax(-1).min() > 1e-2


def test_mlp_width_activation_and_epsilon_are_read(zoo):
    relu, gelu = zoo["neo_relu"].lm.config, zoo["neo_gelu"].lm.config
    assert (relu.intermediate_size, relu.activation, relu.layer_norm_eps) == (48, "relu", 1e-3)
    assert (gelu.intermediate_size, gelu.activation, gelu.layer_norm_eps) == (80, "gelu", 1e-6)
    assert zoo["neo"].lm.config.intermediate_size == 4 * 32  # intermediate_size None means 4 * hidden


def test_tie_word_embeddings(zoo):
    tied, untied = zoo["neo"].model, zoo["neo_untied"].model
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert not torch.equal(untied.lm_head.weight, untied.wte.weight)
    torch.testing.assert_close(untied.lm_head.weight, zoo["neo_untied"].hf.lm_head.weight, atol=0, rtol=0)
    gptj_tied = zoo["gptj_tied"].model
    assert gptj_tied.lm_head.weight is gptj_tied.wte.weight
    assert gptj_tied.lm_head.bias is not None  # GPTJForCausalLM's head keeps its bias when tied


def test_gptj_rotary_and_padded_vocab(gptj):
    cfg = gptj.lm.config
    assert (cfg.vocab_size, cfg.head_dim, cfg.rotary_dim) == (50400, 16, 8)
    assert gptj.model.lm_head.bias is not None


def test_gptj_rotary_dim_null_rotates_the_whole_head(zoo, tokenizer, tmp_path):
    """A config.json with "rotary_dim": null rotates every dim of each head (rotary_dim = head_dim)."""
    full = zoo["gptj_rotary_full"]
    shutil.copytree(full.path, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["rotary_dim"] == 16 == config["n_embd"] // config["n_head"]
    config["rotary_dim"] = None
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    lm = neoj.load(tmp_path / "ckpt", dtype="float32", device="cpu")
    assert lm.config.rotary_dim == 16
    ids = tokenizer.encode(LONG_PROMPT)
    torch.testing.assert_close(neoj_logits(lm, ids), hf_logits(full.hf, ids), atol=ATOL, rtol=0)


def test_gptj_rotary_dim_absent_defaults_like_transformers():
    """transformers reads a GPT-J config.json without rotary_dim as rotary_dim=64."""
    d = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 2048, "n_embd": 256, "n_layer": 1, "n_head": 2}
    assert from_hf_dict(d).rotary_dim == GPTJConfig(**{k: v for k, v in d.items() if k != "model_type"}).rotary_dim


@pytest.mark.parametrize("name", ["neo", "gptj"])
def test_hidden_states_match_base_model(zoo, name):
    tiny = zoo[name]
    base = AutoModel.from_pretrained(tiny.path, dtype=torch.float32).eval()
    assert type(base).__name__ == {"neo": "GPTNeoModel", "gptj": "GPTJModel"}[name]
    ids = tiny.lm.tokenizer.encode(LONG_PROMPT)
    with torch.no_grad():
        ref = base(torch.tensor([ids])).last_hidden_state[0]
    got = tiny.lm.hidden_states(LONG_PROMPT)
    assert got.shape == (len(ids), 32)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """Returns transformers' greedy continuation (n tokens, no EOS stop) of one prompt."""
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["neo", "neo_local3", "gptj"])
def test_greedy_continuation_matches_transformers(zoo, tokenizer, name):
    tiny = zoo[name]
    prompts = [tokenizer.encode(p) for p in PROMPTS[:2]]
    got = generate_batch(tiny.model, tiny.lm.tokenizer, prompts, GREEDY)
    for ids, completion in zip(prompts, got):
        ref = hf_greedy(tiny.hf, ids, 64)
        assert len(ref) == 64
        assert completion.token_ids == ref
        assert completion.finish_reason == "length"
        assert completion.prompt_tokens == len(ids)
        # The continuation runs far past the window in local layers: that is what is being checked.
        assert len(ids) + 64 > 8 * WINDOW


def test_greedy_text_through_the_api_matches_transformers(neo, tokenizer):
    prompt = PROMPTS[2]
    ref = hf_greedy(neo.hf, tokenizer.encode(prompt), 64)
    [completion] = neo.lm.complete(prompt, max_new_tokens=64, temperature=0, stop_at_eos=False)
    assert completion.token_ids == ref
    assert completion.text == tokenizer.decode(ref, skip_special_tokens=True)
    assert neo.lm.generate(prompt, max_new_tokens=64, temperature=0, stop_at_eos=False) == completion.text


def test_gptj_never_generates_padded_vocab_rows(zoo, tokenizer):
    """The padded rows 50257..50399 win every argmax in this checkpoint; neoj must skip them."""
    tiny = zoo["gptj_padded_top"]
    ids = tokenizer.encode(PROMPTS[0])
    ref = hf_logits(tiny.hf, ids)
    assert int(ref[-1].argmax()) >= 50257  # the trap is armed
    [completion] = generate_batch(tiny.model, tiny.lm.tokenizer, [ids], neoj.GenerationParams(
        max_new_tokens=16, temperature=0, stop_at_eos=False))
    assert all(t < 50257 for t in completion.token_ids)
    assert completion.token_ids[0] == int(ref[-1, :50257].argmax())
    full = hf_logits(tiny.hf, ids + completion.token_ids)
    expected = full[len(ids) - 1 : -1, :50257].argmax(-1).tolist()
    assert completion.token_ids == expected
    assert EOS < 50257


def test_attention_kernel_choice_by_device_and_shape():
    """cuDNN's attention builds a plan per new shape: CUDA calls with varying shapes leave it out; the CPU
    and fixed-shape (graphed) calls keep PyTorch's own choice. bf16 on CUDA attends in bf16 (SDPA's
    kernels multiply and softmax in fp32 themselves); everything else in fp32, as the reference."""
    import contextlib

    import torch

    from neoj.model import attention_backends, attention_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(attention_backends(cpu, False), contextlib.nullcontext)
    assert isinstance(attention_backends(cuda, True), contextlib.nullcontext)
    with attention_backends(cuda, False):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert attention_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert attention_dtype(torch.bfloat16, cpu) == torch.float32
    assert attention_dtype(torch.float16, cuda) == torch.float32
    assert attention_dtype(torch.float32, cuda) == torch.float32


def test_the_rotary_table_stays_fp32_when_the_model_changes_dtype(gptj):
    import torch

    from neoj.model import rotary_table
    from neoj.weights import random_model

    model = random_model(gptj.model.config).to(torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16
    assert model.rope.dtype == torch.float32
    assert torch.equal(model.rope, rotary_table(model.config.n_positions, model.config.rotary_dim))
