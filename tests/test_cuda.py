"""neoj on a CUDA GPU: loading, generation, bf16, int8 (neoj's Triton kernel) and int4 (tinygemm) layers,
each against the CPU's results. Skipped where there is no GPU; run on one with `pytest tests/test_cuda.py
tests/test_cuda_graph.py tests/test_gpu_kernels.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS

import neoj
from neoj import linear
from neoj.quantize import QuantLinear, QuantSpec, dequantize, quantize_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
NEW = 24


def reference_layer(scheme: str, group_size: int | None = None):
    """Returns (QuantLinear on cuda, its fp64 dequantized weight and bias on CPU) for a 96x256 layer."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 256, generator=g) * 0.05
    bias = torch.randn(96, generator=g) * 0.1
    spec = QuantSpec.parse(scheme, group_size)
    parts = quantize_weight(w, spec)
    layer = QuantLinear(parts, spec, bias.to(torch.bfloat16).to("cuda"), "cuda")
    return layer, dequantize(parts, spec).double(), bias.to(torch.bfloat16).double()


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_int8_layer_on_cuda(rows):
    """1-16 rows take neoj's Triton kernel, more the dequantized matmul; both equal the dequantized
    reference to bf16 rounding, and no path was turned off by a failure."""
    linear.reset()
    layer, w, b = reference_layer("int8")
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = layer(x.to("cuda")).cpu().double()
    ref = F.linear(x.double(), w) + b
    assert (y - ref).abs().max() / ref.abs().max() < 1e-2
    expected = "triton_int8" if rows <= 16 else "int8_dequant"
    assert linear.plan(linear.describe(layer, x.to("cuda")))[0] == expected
    assert not linear.disabled()


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_int4_layer_on_cuda_uses_tinygemm(rows):
    layer, w, b = reference_layer("int4", 64)
    assert layer.kernel == "int4pack_cuda"
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    y = layer(x.to("cuda")).cpu().double()
    ref = F.linear(x.double(), w) + b
    assert (y - ref).abs().max() / ref.abs().max() < 2e-2


def test_generation_on_cuda_equals_cpu(zoo, tokenizer):
    """fp32 on the GPU (graphed decode) generates the CPU's greedy tokens, both families, a batch."""
    for name in ("neo", "gptj"):
        cpu = neoj.load(zoo[name].path, dtype="float32", device="cpu")
        gpu = neoj.load(zoo[name].path, dtype="float32", device="cuda")
        assert gpu.device.type == "cuda"
        options = dict(max_new_tokens=NEW, temperature=0, stop_at_eos=False)
        assert gpu.generate(PROMPTS, **options) == cpu.generate(PROMPTS, **options)


def test_auto_dtype_on_cuda_is_bf16_and_close_to_fp32(gptj, tokenizer):
    lm = neoj.load(gptj.path, device="cuda")
    assert lm.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.inference_mode():
        ref = gptj.model.logits(gptj.model(ids))
        got = lm.model.logits(lm.model(ids.to("cuda"))).cpu()
    assert (got - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_generation_on_cuda_graphs_equal_eager(gptj, scheme, monkeypatch):
    """A quantized model on the GPU generates the same tokens with and without the CUDA graph."""
    lm = neoj.load(gptj.path, device="cuda", quantize=scheme, group_size=32 if scheme == "int4" else None)
    options = dict(max_new_tokens=NEW, temperature=0, stop_at_eos=False)
    graphed = lm.generate(PROMPTS, **options)
    monkeypatch.setenv("NEOJ_CUDA_GRAPHS", "0")
    assert lm.generate(PROMPTS, **options) == graphed
    assert not linear.disabled()


def test_sampling_on_cuda_is_reproducible(gptj):
    lm = neoj.load(gptj.path, dtype="float32", device="cuda")
    options = dict(max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=3, stop_at_eos=False)
    assert lm.generate(PROMPTS[0], **options) == lm.generate(PROMPTS[0], **options)


def test_scoring_on_cuda_equals_cpu(gptj):
    gpu = neoj.load(gptj.path, dtype="float32", device="cuda")
    a, b = gpu.score(PROMPTS[1]), gptj.lm.score(PROMPTS[1])
    assert a.token_ids == b.token_ids
    assert abs(a.total - b.total) < 1e-3 * abs(b.total)


def test_stop_strings_on_cuda_equal_cpu(gptj):
    """Rows that stop early (the GPU has already queued the next step) end exactly as on the CPU."""
    gpu = neoj.load(gptj.path, dtype="float32", device="cuda")
    options = dict(max_new_tokens=NEW, temperature=0, stop_at_eos=False, stop=[" the", "e"])
    got, want = gpu.complete(PROMPTS, **options), gptj.lm.complete(PROMPTS, **options)
    assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [(c.text, c.token_ids, c.finish_reason)
                                                                    for c in want]
