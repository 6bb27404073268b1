"""The compiled row kernels (neoj/csrc/rowmatmul.c), int8 and fp32, against exact products, and their fallbacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoj import rowmatmul
from neoj.quantize import QuantLinear, QuantSpec, dequantize, quantize_weight

CPU_FLAGS = open("/proc/cpuinfo").read()
HAS_VNNI = "avx512_vnni" in CPU_FLAGS and "avx512bw" in CPU_FLAGS
HAS_AVX512 = "avx512f" in CPU_FLAGS


def exact(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scales.double()[:, None]).t()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def run_without_kernel(code: str, env: dict, cache: Path) -> str:
    """Runs code in a fresh Python with env and an empty kernel cache; returns its stripped stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_kernel_is_built_where_the_cpu_has_vnni():
    # This machine's CI CPU has AVX512-VNNI; elsewhere the kernel must stay off, never crash.
    assert rowmatmul.available() == (HAS_VNNI and os.environ.get("NEOJ_COMPILE", "1") != "0")
    assert rowmatmul.f32_available() == (HAS_AVX512 and os.environ.get("NEOJ_COMPILE", "1") != "0")


@pytest.mark.skipif(not rowmatmul.available(), reason="needs AVX512-VNNI and a C compiler")
@pytest.mark.parametrize("K", [256, 768, 4096, 4352])  # 4352 > 4096 takes the two-row path at M = 1
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N", [1, 6, 77])  # an odd count leaves one row without a partner
def test_int8_rows_equal_the_exact_product(M, K, N):
    torch.manual_seed(M * K + N)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) / 100
    x = torch.randn(M, K)
    got = rowmatmul.int8_rowmatmul(x, q, scales)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # Each activation is rounded to 1/32766 of its block's largest magnitude (15 bits per 256 values),
    # so no output can be off by more than sum |w| x max |x| / 32766, plus fp32 rounding.
    weights = q.double().abs() * scales.double()[:, None]
    bound = x.double().abs().amax(1, keepdim=True) * weights.sum(1)[None] / 32766
    want = exact(x, q, scales)
    assert ((got.double() - want).abs() <= bound + 1e-5 * want.abs() + 1e-6).all()
    assert relative_error(got, want) < 3e-4 or N == 1  # one output can be a near-cancelling sum


@pytest.mark.skipif(not rowmatmul.available(), reason="needs AVX512-VNNI and a C compiler")
@pytest.mark.parametrize("outlier", [None, 300.0])  # GPT-Neo's residual stream has a few such values
def test_int8_rows_are_more_accurate_than_the_bf16_kernel_they_replace(outlier):
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (512, 2048), dtype=torch.int8)
    scales, x = torch.rand(512), torch.randn(1, 2048)
    if outlier:
        x[0, 7] = outlier  # its block of 256 is scaled to it: the other 255 values there lose precision
    want = exact(x, q, scales)
    ours = relative_error(rowmatmul.int8_rowmatmul(x, q, scales), want)
    theirs = relative_error(torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scales.bfloat16()), want)
    assert ours < (theirs if outlier else theirs / 4)


@pytest.mark.skipif(not rowmatmul.available(), reason="needs AVX512-VNNI and a C compiler")
def test_zero_activations_give_zero_and_the_bias_is_added():
    q = torch.randint(-127, 128, (5, 256), dtype=torch.int8)
    assert torch.equal(rowmatmul.int8_rowmatmul(torch.zeros(2, 256), q, torch.ones(5)), torch.zeros(2, 5))
    layer = QuantLinear(quantize_weight(torch.randn(5, 256), QuantSpec("int8")), QuantSpec("int8"),
                        torch.nn.Parameter(torch.arange(5.0)))
    torch.testing.assert_close(layer(torch.zeros(1, 256)), torch.arange(5.0)[None])


@pytest.mark.parametrize("rows", [1, 4, 32, 40])  # 32 x 256 values take the kernel, 40 rows do not
def test_int8_layers_with_256_multiple_inputs_match_their_dequantized_weight(rows):
    torch.manual_seed(rows)
    spec = QuantSpec("int8")
    w, b = torch.randn(40, 256) * 0.1, torch.randn(40)
    layer = QuantLinear(quantize_weight(w, spec), spec, torch.nn.Parameter(b))
    x = torch.randn(rows, 256)
    want = x.double() @ dequantize(quantize_weight(w, spec), spec).double().t() + b.double()
    tolerance = 3e-4 if rowmatmul.available() and rows * 256 <= 8192 else 5e-3  # else bf16 activations
    assert relative_error(layer(x), want) < tolerance


@pytest.mark.parametrize("env", [{"NEOJ_COMPILE": "0"}, {"CC": "/bin/false"}], ids=["disabled", "no-compiler"])
def test_without_the_kernel_int8_layers_fall_back_to_pytorch(env, tmp_path):
    # A fresh cache directory, so a library built earlier cannot hide a failing compiler.
    code = ("import torch; from neoj import rowmatmul; from neoj.quantize import *\n"
            "spec = QuantSpec('int8'); w = torch.randn(8, 256)\n"
            "layer = QuantLinear(quantize_weight(w, spec), spec, None)\n"
            "x = torch.randn(1, 256); want = x @ dequantize(quantize_weight(w, spec), spec).t()\n"
            "torch.testing.assert_close(layer(x), want, atol=0.05, rtol=0.02)\n"
            "print(rowmatmul.available())")
    assert run_without_kernel(code, env, tmp_path) == "False"
    assert not list(tmp_path.rglob("*.so"))  # and no half-built library left behind


@pytest.mark.skipif(not rowmatmul.available(), reason="needs AVX512-VNNI and a C compiler")
@pytest.mark.parametrize("M", [1, 3])
def test_bf16_activations_give_the_fp32_result_rounded_to_bf16(M):
    # A quantized model computes in bf16: the kernel reads bf16 x and bias and writes bf16, rounding
    # its fp32 result to nearest even exactly as PyTorch's .bfloat16() does.
    torch.manual_seed(M)
    q = torch.randint(-127, 128, (70, 512), dtype=torch.int8)
    scales, x, bias = torch.rand(70) / 50, torch.randn(M, 512).bfloat16(), torch.randn(70).bfloat16()
    got = rowmatmul.int8_rowmatmul(x, q, scales, bias)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, rowmatmul.int8_rowmatmul(x.float(), q, scales, bias.float()).bfloat16())
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        rowmatmul.int8_rowmatmul(x.half(), q, scales)


# ---- fp32 ----

needs_f32 = pytest.mark.skipif(not rowmatmul.f32_available(), reason="needs AVX-512 and a C compiler")


@needs_f32
@pytest.mark.parametrize("K", [16, 768, 2064])
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16, 17])  # tiles of 8 activation rows, and partial ones
@pytest.mark.parametrize("N", [1, 2, 3, 4, 77])  # tiles of 3 weight rows, and partial ones
def test_f32_rows_equal_linear(M, K, N):
    torch.manual_seed(M * K + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    want = x.double() @ w.double().t()
    got = rowmatmul.f32_rowmatmul(x, w)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # fp32 sums of K products: within a few ulps of the largest partial sums.
    bound = 1e-6 * K ** 0.5 * (x.double().abs() @ w.double().abs().t()) + 1e-6
    assert ((got.double() - want).abs() <= bound).all()
    torch.testing.assert_close(rowmatmul.f32_rowmatmul(x, w, b), got + b, rtol=0, atol=0)


@needs_f32
def test_f32_rows_do_not_depend_on_their_batch_mates():
    torch.manual_seed(0)
    x, w, b = torch.randn(13, 768), torch.randn(300, 768), torch.randn(300)
    together = rowmatmul.f32_rowmatmul(x, w, b)
    for i in range(13):
        assert torch.equal(rowmatmul.f32_rowmatmul(x[i : i + 1], w, b)[0], together[i])
        assert torch.equal(rowmatmul.f32_rowmatmul(x[: i + 1], w, b)[i], together[i])


@needs_f32
def test_f32_kernel_refuses_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="refused"):
        rowmatmul.f32_rowmatmul(torch.randn(2, 24), torch.randn(5, 24))  # K not a multiple of 16
    with pytest.raises(TypeError, match="float32"):
        rowmatmul.f32_rowmatmul(torch.randn(2, 32).bfloat16(), torch.randn(5, 32).bfloat16())


@pytest.mark.parametrize("env", [{"NEOJ_COMPILE": "0"}, {"CC": "/bin/false"}], ids=["disabled", "no-compiler"])
def test_without_the_kernel_fp32_decode_layers_fall_back_to_onednn(env, tmp_path):
    code = ("import torch; from neoj import rowmatmul; from neoj.kernels import DecodeLinear\n"
            "layer = DecodeLinear(64, 40); x = torch.randn(8, 64)\n"
            "with torch.inference_mode(): got = layer(x)\n"
            "torch.testing.assert_close(got, x @ layer.weight.t() + layer.bias)\n"
            "print(rowmatmul.f32_available())")
    assert run_without_kernel(code, env, tmp_path) == "False"
