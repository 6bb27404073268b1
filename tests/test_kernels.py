"""The CPU decode fast paths give the same results as plain nn.Linear."""

import copy

import pytest
import torch

from neoj.config import from_hf_dict
from neoj.generate import generate_batch
from neoj.kernels import DecodeLinear, use_decode_kernels
from neoj.linear import blocked_matvec
from neoj.sampling import GenerationParams
from neoj.tokenizer import Tokenizer
from neoj.weights import random_model

TINY_J = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 4,
          "rotary_dim": 8}
TINY_NEO = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 64, "hidden_size": 64,
            "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 8}


@pytest.mark.parametrize("out", [48, 50257, 7])
def test_blocked_matvec_equals_linear_for_any_row_count(out):
    w, x, b = torch.randn(out, 96), torch.randn(96), torch.randn(out)
    torch.testing.assert_close(blocked_matvec(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked_matvec(x, w, None), w @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 1), (torch.float32, 4), (torch.float32, 16),
                                        (torch.float32, 17), (torch.bfloat16, 1), (torch.bfloat16, 3)])
def test_decode_linear_matches_plain_linear(dtype, rows):
    plain = random_model(from_hf_dict(TINY_J), dtype=dtype, seed=1)
    fast = use_decode_kernels(copy.deepcopy(plain), allow_compile=True)
    assert sum(isinstance(m, DecodeLinear) for m in fast.modules()) == 4 * 2 + 2 * 2 + 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for a, b in zip(plain.modules(), fast.modules()):
            if isinstance(b, DecodeLinear):
                xin = torch.randn(rows, 1, b.in_features, dtype=dtype)
                torch.testing.assert_close(b(xin), torch.nn.functional.linear(xin, a.weight, a.bias),
                                           rtol=tol, atol=tol)


def test_fp32_few_row_decode_uses_the_row_kernel(monkeypatch):
    from neoj import rowmatmul

    if not rowmatmul.f32_available():
        pytest.skip("no kernel variant for this CPU, or no C compiler")
    calls = []
    real = rowmatmul.F32Product.__call__
    monkeypatch.setattr(rowmatmul.F32Product, "__call__", lambda self, x: calls.append(x.shape) or real(self, x))
    narrow, wide = DecodeLinear(64, 40), DecodeLinear(3072, 8)
    with torch.inference_mode():
        for rows in (1, 2, 16, 17):
            narrow(torch.randn(rows, 64))
        wide(torch.randn(1, 3072))
    # neoj.linear.RULES: with AVX-512 or AVX2 the kernel takes 1-16 rows; with NEON 1-8 rows.
    isa = rowmatmul.variant_name()
    if isa in ("avx512_vnni", "avx512", "avx2"):
        assert calls == [(1, 64), (2, 64), (16, 64), (1, 3072)]
    else:
        assert calls == [(1, 64), (2, 64), (1, 3072)]


@pytest.mark.parametrize("config", [TINY_J, TINY_NEO])
def test_greedy_tokens_unchanged_by_decode_kernels(config):
    plain = random_model(from_hf_dict(config), seed=2)
    fast = use_decode_kernels(copy.deepcopy(plain))
    if config is TINY_NEO:
        assert fast.lm_head.weight is fast.wte.weight  # still tied after the swap
    params = GenerationParams(max_new_tokens=20, temperature=0, stop_at_eos=False)
    tok = Tokenizer.from_dir()
    prompts = [[10, 20, 30, 40], [5, 6]]  # a batch of two (oneDNN path), then each alone (matvec path)
    batched = [c.token_ids for c in generate_batch(fast, tok, prompts, params)]
    assert batched == [c.token_ids for c in generate_batch(plain, tok, prompts, params)]
    assert [generate_batch(fast, tok, [p], params)[0].token_ids for p in prompts] == batched
