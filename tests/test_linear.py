"""neoj.linear, the one dispatch table for linear layers: its rules, every CPU path against fp64 products,
batch independence, autograd, and that a failing path turns off only itself."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from neoj import linear, rowmatmul
from neoj.config import from_hf_dict
from neoj.kernels import DecodeLinear, use_decode_kernels
from neoj.linear import RULES, Call
from neoj.quantize import QuantLinear, QuantSpec, dequantize, quantize_weight
from neoj.weights import random_model


@pytest.fixture(autouse=True)
def fresh_dispatch():
    """Each test starts and ends with every path enabled and no cached choice."""
    linear.reset()
    yield
    linear.reset()


def call(kind="f32", rows=1, inn=768, isa="avx2", device="cpu", weight_bytes=1 << 20, dtype=torch.float32,
         allow_compile=False) -> Call:
    return Call(kind, device, rows, inn, weight_bytes, dtype, allow_compile, isa)


# ---- the table ----

def test_each_kind_ends_in_one_final_rule_and_every_path_exists():
    kinds = {r.kind for r in RULES}
    for kind in kinds:
        rules = [r for r in RULES if r.kind == kind]
        assert [r.final for r in rules].count(True) == 1 and rules[-1].final, kind
    assert {r.path for r in RULES} <= set(linear.IMPLS)


def test_every_threshold_gives_its_reason_and_where_it_was_measured():
    for rule in RULES:
        assert rule.reason, rule
        has_threshold = (rule.max_rows, rule.max_in, rule.max_elements) != (None, None, None) or rule.min_in or \
            rule.min_weight_bytes or rule.min_rows > 1
        if has_threshold:
            assert "BENCHMARKS.md" in rule.reason, rule


@pytest.mark.parametrize("c,want", [
    (call(rows=8), ("rowmatmul_f32", "onednn_linear", "linear")),
    (call(rows=16), ("rowmatmul_f32", "onednn_linear", "linear")),  # AVX2: measured up to 16 rows
    (call(rows=9, isa="neon"), ("onednn_linear", "linear")),  # NEON: measured up to 8
    (call(rows=8, isa="neon"), ("rowmatmul_f32", "onednn_linear", "linear")),
    (call(rows=16, isa="avx512"), ("rowmatmul_f32", "onednn_linear", "linear")),
    (call(rows=17), ("onednn_linear", "linear")),
    (call(rows=65), ("linear",)),
    (call(rows=1, isa="avx2"), ("rowmatmul_f32", "blocked_matvec", "onednn_linear", "linear")),  # 8 lanes: any width
    (call(rows=1, isa="avx512"), ("rowmatmul_f32", "blocked_matvec", "onednn_linear", "linear")),
    (call(rows=1, isa="avx512_vnni"), ("rowmatmul_f32", "blocked_matvec", "onednn_linear", "linear")),
    (call(rows=4, inn=776), ("onednn_linear", "linear")),  # not a multiple of 16
    (call(rows=4, isa="none"), ("onednn_linear", "linear")),  # no kernels built
    (call(rows=4, device="cuda"), ("linear",)),
    (call("half", dtype=torch.bfloat16), ("linear",)),
    (call("half", dtype=torch.bfloat16, allow_compile=True), ("compiled_matvec", "linear")),
    (call("int8pack", rows=1, isa="avx512_vnni"), ("rowmatmul_int8", "int8pack", "int8_dequant")),
    (call("int8pack", rows=16, isa="avx512_vnni"), ("int8pack", "int8_dequant")),  # past L1 at VNNI's speed
    (call("int8pack", rows=8, inn=2048, isa="avx2"), ("rowmatmul_int8", "int8pack", "int8_dequant")),
    (call("int8pack", rows=8, inn=2048, isa="avx512"), ("rowmatmul_int8", "int8pack", "int8_dequant")),
    (call("int8pack", rows=17, isa="avx512"), ("int8pack", "int8_dequant")),
    (call("int8pack", rows=128, inn=2048, isa="avx2"), ("rowmatmul_int8", "int8_dequant")),  # AVX2 prefill
    (call("int8pack", rows=513, inn=2048, isa="avx2"), ("int8_dequant",)),
    (call("int8pack", rows=1, inn=320, isa="avx2"), ("int8pack", "int8_dequant")),  # not a multiple of 256
    (call("int8pack", rows=1, dtype=torch.float16, isa="avx2"), ("int8pack", "int8_dequant")),
    (call("int8pack", rows=64, isa="avx512_vnni"), ("int8_dequant",)),  # prefill
    (call("int8pack", rows=1, inn=2048, isa="none", weight_bytes=16 << 20, allow_compile=True),
     ("compiled_int8_matvec", "int8pack", "int8_dequant")),
    (call("int8pack", rows=1, inn=4096, isa="none", weight_bytes=16 << 20, allow_compile=True),
     ("int8pack", "int8_dequant")),
    (call("int8pack", rows=4, device="cuda"), ("triton_int8", "int8pack_cuda", "int8_dequant")),
    (call("int8pack", rows=17, device="cuda"), ("int8_dequant",)),  # prefill: one tensor-core matmul
    (call("int4pack_cpu", rows=1), ("int4pack_cpu",)),
    (call("dequantize", rows=1, isa="avx2"), ("rowmatmul_int4", "int4_dequant")),  # int4, neoj's portable form
    (call("dequantize", rows=16, inn=2048, isa="avx2"), ("rowmatmul_int4", "int4_dequant")),
    (call("dequantize", rows=128, isa="avx2"), ("rowmatmul_int4", "int4_dequant")),  # prefill: still the kernel
    (call("dequantize", rows=513, isa="avx2"), ("int4_dequant",)),  # long prompts
    (call("dequantize", rows=1, isa="avx512_vnni"), ("int4_dequant",)),  # such layers use tinygemm's form there
    (call("dequantize", rows=1, isa="neon"), ("int4_dequant",)),
    (call("int8_grad", rows=1), ("int8_dequant",)),
])
def test_the_plan_for_a_call(c, want):
    assert linear.plan(c) == want


# ---- every path against fp64 ----

def f32_layer(out=77, inn=768, bias=True, dtype=torch.float32):
    torch.manual_seed(out + inn)
    layer = DecodeLinear(inn, out, bias=bias).to(dtype)
    return layer


def quant_layer(scheme="int8", out=77, inn=768):
    torch.manual_seed(out + inn)
    spec = QuantSpec(scheme, 128)
    w, b = torch.randn(out, inn) * 0.05, torch.randn(out)
    parts = quantize_weight(w, spec)
    return QuantLinear(parts, spec, torch.nn.Parameter(b, requires_grad=False)), dequantize(parts, spec).double(), b


def relative_error(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def needs_path(path):
    kernel_available = {"rowmatmul_f32": rowmatmul.f32_available, "rowmatmul_int8": rowmatmul.int8_available,
                        "rowmatmul_int4": rowmatmul.int4_available}
    if path in kernel_available and not kernel_available[path]():
        pytest.skip("no kernel variant for this CPU, or no C compiler")
    if path.startswith("compiled") and not linear.compile_allowed():
        pytest.skip("NEOJ_COMPILE=0")


@pytest.mark.parametrize("path,rows", [("rowmatmul_f32", 1), ("rowmatmul_f32", 9), ("blocked_matvec", 1),
                                       ("onednn_linear", 5), ("linear", 5)])
def test_fp32_paths_equal_the_exact_product(path, rows):
    needs_path(path)
    layer = f32_layer()
    x = torch.randn(rows, 768)
    want = x.double() @ layer.weight.double().t() + layer.bias.double()
    with torch.inference_mode():
        got = linear.IMPLS[path](layer, x)
    assert got.shape == (rows, 77) and got.dtype == torch.float32
    assert relative_error(got, want) < 1e-6


def test_the_compiled_half_precision_row_equals_the_exact_product():
    needs_path("compiled_matvec")
    layer = f32_layer(dtype=torch.bfloat16)
    x = torch.randn(1, 768).bfloat16()
    want = x.double() @ layer.weight.double().t() + layer.bias.double()
    with torch.inference_mode():
        got = linear.IMPLS["compiled_matvec"](layer, x)
    assert got.dtype == torch.bfloat16 and relative_error(got, want) < 4e-3  # fp32 sums, rounded to bf16 once


def test_a_capped_process_keeps_its_own_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    linear.keep_inductor_cache_per_capability()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # uncapped: PyTorch's own choice
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    linear.keep_inductor_cache_per_capability()
    chosen = tmp_path / "neoj" / "inductor-avx2"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen.resolve())
    assert chosen.is_dir() and chosen.stat().st_mode & 0o777 == 0o700
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))  # as PyTorch leaves it
    linear.keep_inductor_cache_per_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen.resolve())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    linear.keep_inductor_cache_per_capability()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stays


def test_compiled_products_stay_right_across_processes_held_to_other_isas(tmp_path):
    """PyTorch's Inductor cache key leaves ATEN_CPU_CAPABILITY out: a process held to AVX2 that shared the cache
    of an uncapped one (on an AVX-512 CPU) got wrong products from its kernels."""
    needs_path("compiled_int8_matvec")
    code = ("import torch\nfrom neoj import linear\ntorch.manual_seed(0)\n"
            "q, s = torch.randint(-127, 128, (300, 768), dtype=torch.int8), torch.rand(300) / 100\n"
            "x = torch.randn(1, 768)\ngot = linear.compiled('int8_matvec')(x, q, s).double()\n"
            "want = (x.double() @ q.double().t())[0] * s.double()\nprint(float((got - want).norm() / want.norm()))")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env.update(TMPDIR=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))  # one fresh Inductor default cache
    for capped in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}, {}):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **capped}, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert float(out.stdout.split()[-1]) < 1e-5


@pytest.mark.parametrize("path,rows,dtype,tolerance", [
    ("rowmatmul_int8", 1, torch.float32, 3e-4), ("rowmatmul_int8", 6, torch.float32, 3e-4),
    ("rowmatmul_int8", 40, torch.float32, 3e-4),
    ("rowmatmul_int8", 3, torch.bfloat16, 5e-3), ("compiled_int8_matvec", 1, torch.float32, 1e-5),
    ("int8pack", 3, torch.float32, 5e-3), ("int8_dequant", 70, torch.float32, 1e-6),
    ("int8_dequant", 70, torch.bfloat16, 5e-3),
])
def test_int8_paths_equal_the_exact_product(path, rows, dtype, tolerance):
    needs_path(path)
    layer, w, b = quant_layer("int8")
    x = torch.randn(rows, 768).to(dtype)
    want = x.double() @ w.t() + b.double()
    with torch.inference_mode():
        got = linear.IMPLS[path](layer, x)
    assert got.shape == (rows, 77) and got.dtype == dtype
    assert relative_error(got, want) < tolerance


@pytest.mark.parametrize("rows", [1, 5])
def test_int4_in_tinygemms_form_equals_the_exact_product(rows, monkeypatch):
    monkeypatch.setattr(linear, "int4_kernel_on_cpu", lambda: False)  # as with AVX-512 (INT4_KERNEL_ISAS)
    layer, w, b = quant_layer("int4")
    assert layer.kernel == "int4pack_cpu"
    x = torch.randn(rows, 768)
    with torch.inference_mode():
        got = layer(x)
    assert relative_error(got, x.double() @ w.t() + b.double()) < 1e-2  # bf16 activations and scales


@pytest.mark.parametrize("path,rows,dtype,tolerance", [  # the kernel: 8-bit activations per group (~0.7%)
    ("rowmatmul_int4", 1, torch.float32, 1.2e-2), ("rowmatmul_int4", 7, torch.float32, 1.2e-2),
    ("rowmatmul_int4", 40, torch.float32, 1.2e-2),
    ("rowmatmul_int4", 2, torch.bfloat16, 1.5e-2), ("int4_dequant", 40, torch.float32, 1e-6),
])
def test_int4_in_the_portable_form_equals_the_exact_product(path, rows, dtype, tolerance, monkeypatch):
    """Where neoj's int4 kernel runs (AVX2), CPU int4 layers keep the portable form: its kernel for a few rows,
    dequantizing a block of output rows at a time for prefill."""
    if not rowmatmul.int4_available():
        pytest.skip("no x86 kernel variant for this CPU, or no C compiler")
    monkeypatch.setattr(linear, "int4_kernel_on_cpu", lambda: True)
    monkeypatch.setattr(linear, "_DEQUANT_ROWS", 32)  # 77 rows: three blocks
    layer, w, b = quant_layer("int4")
    assert layer.kernel == "dequantize" and layer.qweight.dtype == torch.uint8
    x = torch.randn(rows, 768).to(dtype)
    with torch.inference_mode():
        got = linear.IMPLS[path](layer, x)
        via_forward = layer(x)
    assert got.shape == (rows, 77) and got.dtype == dtype
    assert relative_error(got, x.double() @ w.t() + b.double()) < tolerance
    if path == "rowmatmul_int4" and rowmatmul.variant_name() in linear.INT4_KERNEL_ISAS:
        assert torch.equal(via_forward, got)


# ---- rows alone or in a batch ----

def test_decode_layers_give_a_row_the_same_values_alone_or_in_a_batch():
    if not (rowmatmul.f32_available() and rowmatmul.int8_available()):
        pytest.skip("no kernel variant for this CPU, or no C compiler")
    # Within the kernels' range in RULES: fp32 rows 1-16 with AVX-512 or AVX2 (8 tested there), 1-8 with NEON; int8
    # rows of 1024, 1-16 (1-8 with VNNI: rows x in <= 8192).
    f32, (int8, _, _) = f32_layer(inn=3072), quant_layer("int8", inn=1024)
    isa = rowmatmul.variant_name()
    max_f32_rows, max_int8_rows = (16, 8) if isa == "avx512_vnni" else (16, 16) if isa == "avx512" else (8, 16)
    x = torch.randn(16, 3072)
    with torch.inference_mode():
        for layer, rows in ((f32, max_f32_rows), (int8, max_int8_rows)):
            x = x[:, : layer.in_features]
            batch = layer(x[:rows])
            for i in range(rows):
                assert torch.equal(layer(x[i : i + 1])[0], batch[i])


# ---- autograd ----

def test_quantized_layers_pass_gradients_to_their_inputs():
    layer, w, _ = quant_layer("int8")
    x = torch.randn(2, 768, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, w.float().sum(0).expand(2, -1), rtol=1e-2, atol=1e-2)  # bf16 weight


def test_trainable_decode_layers_use_autograd():
    layer = f32_layer()
    x = torch.randn(4, 768)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(77, -1))


# ---- choices remembered on the layer ----

def test_a_layer_remembers_its_plan_until_the_choices_or_its_weight_change(monkeypatch):
    described = []
    real_describe = linear.describe
    monkeypatch.setattr(linear, "describe", lambda layer, x: described.append(x.shape[0]) or real_describe(layer, x))
    layer = f32_layer(out=40, inn=64)
    with torch.inference_mode():
        for _ in range(3):
            layer(torch.randn(1, 64))
        layer(torch.randn(2, 64))  # another row count: described once more
        layer(torch.randn(2, 64))
        assert described == [1, 2]
        linear.reset()  # forgets the layer's plans too
        layer(torch.randn(1, 64))
        assert described == [1, 2, 1]
        layer.weight = torch.nn.Parameter(torch.randn(40, 64), requires_grad=False)  # a new weight
        want = torch.randn(1, 64)
        torch.testing.assert_close(layer(want), want @ layer.weight.t() + layer.bias)
        assert described == [1, 2, 1, 1]
        layer.to(torch.bfloat16)  # the same Parameter, now bf16: another kind of call
        y = layer(want.bfloat16())
        assert y.dtype == torch.bfloat16 and described == [1, 2, 1, 1, 1]
    layer.float()
    layer(torch.randn(1, 64))  # with autograd on, every call is described
    layer(torch.randn(1, 64))
    assert described[-2:] == [1, 1]


def test_the_fp32_kernel_product_follows_the_layers_tensors():
    needs_path("rowmatmul_f32")
    layer = DecodeLinear(64, 40)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        first = layer(x)
        product = linear.f32_product(layer)
        assert product.weight is layer.weight and product.bias is layer.bias  # read in place, no copies
        layer(x)
        assert linear.f32_product(layer) is product  # made once, reused
        torch.testing.assert_close(first, x @ layer.weight.t() + layer.bias)
        layer.weight.mul_(2.0)  # changed in place: the same product sees it
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias)
        assert linear.f32_product(layer) is product
        layer.bias = None  # a new (absent) bias: a new product
        torch.testing.assert_close(layer(x), x @ layer.weight.t())
        assert linear.f32_product(layer) is not product
        layer.weight = torch.nn.Parameter(-layer.weight.detach())  # a new weight tensor
        torch.testing.assert_close(layer(x), x @ layer.weight.t())
        assert "_f32_product" in layer.__dict__
    layer.to("cpu")  # moving a layer drops what was remembered
    assert "_f32_product" not in layer.__dict__


def test_the_fp32_product_checks_its_weights_once_and_each_activation():
    needs_path("rowmatmul_f32")
    k = rowmatmul.kernels()
    w = torch.randn(5, 32)
    with pytest.raises(ValueError, match="bias"):
        k.bind_f32(w, torch.zeros(4))
    with pytest.raises(TypeError, match="float32"):
        k.bind_f32(w.double())
    product = k.bind_f32(w, torch.ones(5))
    with pytest.raises(ValueError, match="do not fit"):
        product(torch.randn(1, 48))
    with pytest.raises(TypeError, match="float32"):
        product(torch.randn(1, 32).bfloat16())
    x = torch.randn(3, 32)
    torch.testing.assert_close(product(x), x @ w.t() + 1.0)
    strided = torch.randn(32, 5).t()  # not contiguous: multiplied from a copy, which would miss later changes
    once = k.bind_f32(strided)
    torch.testing.assert_close(once(x), x @ strided.t())
    assert not once.holds(strided, None)
    b = torch.ones(5)
    bound = k.bind_f32(w, b)
    assert bound.holds(w, b) and not bound.holds(w, b.clone()) and not bound.holds(w.clone(), b)


def test_the_int8_kernel_product_follows_the_layers_tensors():
    needs_path("rowmatmul_int8")
    layer, w, b = quant_layer("int8", out=40, inn=256)
    b = b.clone()  # the layer's bias shares b's storage and is changed below
    x = torch.randn(1, 256)
    with torch.inference_mode():
        first = layer(x)
        product = linear.int8_product(layer)
        layer(x)
        assert linear.int8_product(layer) is product  # made once, reused
        assert relative_error(first, x.double() @ w.t() + b.double()) < 3e-4
        layer.bias.add_(1.0)  # changed in place: the product's copy of it is remade
        torch.testing.assert_close(layer(x), first + 1.0)
        assert linear.int8_product(layer) is not product
        layer.bias = None
        torch.testing.assert_close(layer(x), first - b, rtol=1e-5, atol=1e-5)
        layer.qweight = -layer.qweight  # a new weight tensor
        torch.testing.assert_close(layer(x), -(first - b), rtol=1e-5, atol=1e-5)
        y = layer(x.bfloat16())  # bf16 activations: the same product, its own bias dtype
        assert y.dtype == torch.bfloat16
        assert "_int8_product" in layer.__dict__
        layer.to("cpu")  # moving a layer drops what was remembered (it would keep the old tensors alive)
        assert "_int8_product" not in layer.__dict__ and "_linear_plans" not in layer.__dict__


def test_a_layers_weight_and_bias_are_found_wherever_the_module_keeps_them():
    layer, _, _ = quant_layer("int8", out=8, inn=256)
    assert linear.weight_of(layer) is layer.qweight and linear.bias_of(layer) is layer.bias  # buffer, parameter
    layer.bias = None
    assert linear.bias_of(layer) is None
    plain = torch.nn.Linear(16, 4, bias=False)
    assert linear.weight_of(plain) is plain.weight and linear.bias_of(plain) is None
    holder = torch.nn.Module()  # tensors kept as plain attributes
    holder.qweight, holder.bias = torch.zeros(2, 2, dtype=torch.int8), torch.ones(2)
    assert linear.weight_of(holder) is holder.qweight and linear.bias_of(holder) is holder.bias
    del holder.bias
    assert linear.bias_of(holder) is None


def test_the_int8_product_checks_its_weights_once_and_each_activation():
    needs_path("rowmatmul_int8")
    k = rowmatmul.kernels()
    q, s = torch.randint(-127, 128, (4, 256), dtype=torch.int8), torch.rand(4)
    with pytest.raises(ValueError, match="scales"):
        k.bind_int8(q, s[:3])
    with pytest.raises(ValueError, match="bias"):
        k.bind_int8(q, s, torch.zeros(5))
    with pytest.raises(TypeError, match="int8 weights"):
        k.bind_int8(q.to(torch.int16), s)
    product = k.bind_int8(q, s, torch.zeros(4))
    with pytest.raises(ValueError, match="do not fit"):
        product(torch.randn(1, 512))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        product(torch.randn(1, 256).half())
    x = torch.randn(3, 256)
    assert torch.equal(product(x), k.int8(x, q, s, torch.zeros(4)))


# ---- failures ----

def test_a_failing_path_turns_off_only_itself(monkeypatch):
    if not (rowmatmul.f32_available() and rowmatmul.int8_available()):
        pytest.skip("no kernel variant for this CPU, or no C compiler")

    def broken(layer, x):
        raise RuntimeError("simulated failure")

    used = []
    real_int8 = linear.IMPLS["rowmatmul_int8"]
    monkeypatch.setitem(linear.IMPLS, "rowmatmul_f32", broken)
    monkeypatch.setitem(linear.IMPLS, "rowmatmul_int8", lambda layer, x: used.append(1) or real_int8(layer, x))
    f32 = f32_layer(out=40, inn=64)
    int8, w, b = quant_layer("int8", out=40, inn=256)
    x = torch.randn(8, 64)
    with torch.inference_mode():
        torch.testing.assert_close(f32(x), x @ f32.weight.t() + f32.bias)  # through oneDNN instead
        f32(x)
        assert linear.disabled() == {"rowmatmul_f32"}
        xq = torch.randn(2, 256)
        assert relative_error(int8(xq), xq.double() @ w.t() + b.double()) < 3e-4
    assert used == [1]  # the int8 kernel still runs


def test_a_reference_path_is_never_turned_off(monkeypatch):
    def broken(layer, x):
        raise ValueError("bad input")

    monkeypatch.setitem(linear.IMPLS, "linear", broken)
    with pytest.raises(ValueError, match="bad input"):
        with torch.inference_mode():
            f32_layer()(torch.randn(100, 768))  # 100 rows: F.linear is the only path
    assert linear.disabled() == frozenset()


# ---- building at load ----

def test_kernels_are_built_when_the_model_is_prepared_not_at_the_first_call(tmp_path):
    code = ("from neoj.config import from_hf_dict; from neoj.weights import random_model\n"
            "from neoj.kernels import use_decode_kernels; from pathlib import Path; import os\n"
            "cfg = from_hf_dict({'model_type': 'gptj', 'vocab_size': 512, 'n_positions': 32, 'n_embd': 64,\n"
            "                    'n_layer': 1, 'n_head': 4, 'rotary_dim': 8})\n"
            "use_decode_kernels(random_model(cfg, seed=0))\n"
            "print(len(list(Path(os.environ['XDG_CACHE_HOME']).rglob('*.so'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("1" if rowmatmul.candidate_variants() else "0")


def test_prepared_tiny_model_keeps_its_greedy_tokens():
    cfg = from_hf_dict({"model_type": "gptj", "vocab_size": 512, "n_positions": 32, "n_embd": 256, "n_layer": 2,
                        "n_head": 4, "rotary_dim": 8})
    plain = random_model(cfg, seed=3)
    fast = use_decode_kernels(copy.deepcopy(plain))
    x = torch.randint(0, 512, (3, 7))
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)
