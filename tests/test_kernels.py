"""The compiled decode kernel gives the same logits and tokens as plain nn.Linear."""

import copy

import torch

from neoj.config import from_hf_dict
from neoj.generate import generate_batch
from neoj.kernels import DecodeLinear, use_decode_kernels
from neoj.sampling import GenerationParams
from neoj.tokenizer import Tokenizer
from neoj.weights import random_model

TINY_J = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
          "rotary_dim": 8}


def test_decode_kernels_match_plain_linear():
    plain = random_model(from_hf_dict(TINY_J), seed=1)
    fast = use_decode_kernels(copy.deepcopy(plain))
    assert sum(isinstance(m, DecodeLinear) for m in fast.modules()) == 4 * 2 + 2 * 2 + 1
    assert fast.lm_head.weight is not fast.wte.weight  # GPT-J's head is untied, and stays so
    with torch.inference_mode():
        for a, b in zip(plain.modules(), fast.modules()):
            if isinstance(b, DecodeLinear):
                xin = torch.randn(1, 1, b.in_features)
                torch.testing.assert_close(b(xin), torch.nn.functional.linear(xin, a.weight, a.bias),
                                           rtol=1e-5, atol=1e-5)
    params = GenerationParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    tok = Tokenizer.from_dir()
    prompts = [[10, 20, 30, 40]]
    assert generate_batch(fast, tok, prompts, params)[0].token_ids == generate_batch(plain, tok, prompts, params)[0].token_ids
