"""The compiled row kernels (neoj/csrc/rowmatmul_*.c), every ISA variant this CPU can run, int8 and fp32,
against fp64 products; their selection by CPU features; safe building; and the fallbacks without them.

Variant tests are generated, at collection, for the variants this CPU runs, capped by NEOJ_ISA
(NEOJ_ISA=avx2 runs the suite as an AVX2-only CPU would); each variant it cannot run is one skipped test
(test_each_variant_this_cpu_runs_builds_and_names_itself), not one per case. Nothing reads the CPU at
import, and where its features cannot be read (no /proc/cpuinfo) collection still works.
"""

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neoj import rowmatmul
from neoj.quantize import QuantLinear, QuantSpec, dequantize, quantize_weight

ARCH_VARIANTS = [v.name for v in rowmatmul.VARIANTS if v.arch == rowmatmul.machine()]


def pytest_generate_tests(metafunc):
    """Parametrizes `variant` over the variants usable here (asked at collection, not at import)."""
    if "variant" in metafunc.fixturenames:
        usable = usable_variant_names()
        metafunc.parametrize("variant", usable or [pytest.param("none", marks=pytest.mark.skip(
            reason="no kernel variant for this CPU (or NEOJ_ISA=none)"))], scope="module")


def usable_variant_names() -> list[str]:
    """Returns the variants this CPU runs, capped by NEOJ_ISA (reads the CPU's features)."""
    return [v.name for v in rowmatmul.usable_variants()]


@pytest.fixture(scope="module")
def kernels(variant, tmp_path_factory):
    """The variant's kernels, built in a cache of this test module's own."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        yield rowmatmul.load(variant)
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old


def exact(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scales.double()[:, None]).t()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def run_python(code: str, env: dict, cache: Path) -> str:
    """Runs code in a fresh Python with env and the kernel cache `cache`; returns its stripped stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_collection_works_where_the_cpu_features_cannot_be_read(tmp_path):
    # Off Linux (no /proc/cpuinfo, no sysctl answer) the features are empty: no variant runs, and collecting
    # this module must still work, each variant test then one skip.
    code = ("import sys, pytest; from neoj import rowmatmul_build\n"
            "rowmatmul_build.cpu_features = lambda: frozenset()\n"
            f"sys.exit(pytest.main(['--collect-only', '-q', '-o', 'addopts=', '-p', 'no:cacheprovider', {__file__!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "test_int8_rows_equal_the_exact_product[none" in out.stdout and "product[avx2" not in out.stdout


@pytest.mark.parametrize("name", ARCH_VARIANTS)
def test_each_variant_this_cpu_runs_builds_and_names_itself(name, tmp_path, monkeypatch):
    if name not in usable_variant_names():
        pytest.skip(f"this CPU (or NEOJ_ISA) does not run {name}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    k = rowmatmul.load(name)
    assert k.name == name and k.built
    assert not rowmatmul.load(name).built  # the second load finds it in the cache


# ---- int8 ----

@pytest.mark.parametrize("K", [256, 768, 4352])  # 4352 > 4096 takes the VNNI build's two-row path at M = 1
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 17])  # groups of 3 or 4 rows, passes of 16, partial ones
@pytest.mark.parametrize("N", [1, 2, 3, 5, 77])  # tiles of 2-4 weight rows, partial last ones
def test_int8_rows_equal_the_exact_product(kernels, M, K, N):
    torch.manual_seed(M * K + N)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    scales = torch.rand(N) / 100
    x = torch.randn(M, K)
    got = kernels.int8(x, q, scales)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # Each activation is rounded to 1/32766 of its block's largest magnitude (15 bits per 256 values),
    # so no output can be off by more than sum |w| x max |x| / 32766, plus fp32 rounding.
    weights = q.double().abs() * scales.double()[:, None]
    bound = x.double().abs().amax(1, keepdim=True) * weights.sum(1)[None] / 32766
    want = exact(x, q, scales)
    assert ((got.double() - want).abs() <= bound + 1e-5 * want.abs() + 1e-6).all()
    assert relative_error(got, want) < 3e-4 or N == 1  # one output can be a near-cancelling sum


def test_int8_rows_do_not_depend_on_their_batch_mates(kernels):
    torch.manual_seed(0)
    q, scales = torch.randint(-127, 128, (101, 4352), dtype=torch.int8), torch.rand(101) / 100
    x, b = torch.randn(11, 4352), torch.randn(101)
    together = kernels.int8(x, q, scales, b)
    for i in range(11):
        assert torch.equal(kernels.int8(x[i : i + 1], q, scales, b)[0], together[i])
        assert torch.equal(kernels.int8(x[: i + 1], q, scales, b)[i], together[i])


# ---- int4 (x86 builds) ----

def int4_weight(N: int, K: int, group: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Returns neoj's portable int4 parts of a random (N, K) weight and the fp64 weight they stand for."""
    torch.manual_seed(seed)
    spec = QuantSpec("int4", group)
    parts = quantize_weight(torch.randn(N, K) / 30, spec)
    return parts, dequantize(parts, spec).double()


def nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """Returns the 4-bit values of neoj's portable int4 weight bytes (the even column in the high nibble), fp64."""
    q = qweight.to(torch.int16)
    return torch.stack([q >> 4, q & 15], dim=-1).flatten(-2).double()


def needs_int4(kernels):
    if kernels.int4_fn is None:
        pytest.skip(f"the {kernels.name} build has no int4 product (x86 only)")


@pytest.mark.parametrize("K,group", [(256, 32), (768, 128), (2048, 64), (512, 256)])
@pytest.mark.parametrize("M", [1, 2, 4, 8, 17])  # one row (4 weight rows a tile), groups of 3, passes of 16
@pytest.mark.parametrize("N", [1, 3, 5])
def test_int4_rows_equal_the_exact_product(kernels, M, K, N, group):
    needs_int4(kernels)
    parts, w = int4_weight(N, K, group, seed=M * K + N)
    x, b = torch.randn(M, K), torch.randn(N)
    got = kernels.int4(x, parts["qweight"], parts["scales"], parts["mins"], b)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # Each activation is rounded to 1/254 of its group's largest magnitude, and that rounding meets only the
    # centred nibbles (q - 8) * scale; the rest (8 * scale + min) multiplies the fp32 sum of the activations.
    want = x.double() @ w.t() + b.double()
    step = x.double().view(M, K // group, group).abs().amax(2) / 254  # (M, groups): the largest rounding
    centred = (nibbles(parts["qweight"]) - 8).abs().view(N, K // group, group).sum(2) * parts["scales"].double()
    bound = step @ centred.t()
    assert ((got.double() - want).abs() <= bound + 1e-5 * want.abs() + 1e-5).all()


@pytest.mark.parametrize("K,group", [(256, 32), (2048, 128), (1024, 256)])
def test_int4_activation_rounding_is_far_below_the_weights_own(kernels, K, group):
    needs_int4(kernels)
    torch.manual_seed(K)
    exact = torch.randn(256, K) / 30
    spec = QuantSpec("int4", group)
    parts = quantize_weight(exact, spec)
    w = dequantize(parts, spec).double()
    x = torch.randn(8, K)
    want = x.double() @ w.t()
    got = kernels.int4(x, parts["qweight"], parts["scales"], parts["mins"])
    weights_own = relative_error(x @ exact.t(), want)  # what int4 weights cost, about 10%
    assert relative_error(got, want) < min(1e-2, weights_own / 8)


def test_int4_rows_do_not_depend_on_their_batch_mates_and_take_bf16(kernels):
    needs_int4(kernels)
    parts, w = int4_weight(37, 1024, 128)
    x, b = torch.randn(11, 1024), torch.randn(37)
    args = (parts["qweight"], parts["scales"], parts["mins"])
    together = kernels.int4(x, *args, b)
    for i in range(11):
        assert torch.equal(kernels.int4(x[i : i + 1], *args, b)[0], together[i])
        assert torch.equal(kernels.int4(x[: i + 1], *args, b)[i], together[i])
    half = kernels.int4(x.bfloat16(), *args, b.bfloat16())
    assert half.dtype == torch.bfloat16
    assert relative_error(half, x.bfloat16().double() @ w.t() + b.bfloat16().double()) < 1e-2


def test_int4_product_refuses_what_does_not_fit(kernels):
    needs_int4(kernels)
    parts, _ = int4_weight(4, 512, 128)
    q, scales, mins = parts["qweight"], parts["scales"], parts["mins"]
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernels.int4(torch.randn(2, 256), q, scales, mins)
    with pytest.raises(ValueError, match="group size 16"):
        kernels.int4(torch.randn(2, 512), q, scales.repeat(1, 8), mins.repeat(1, 8))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.int4(torch.randn(2, 512), q, scales, mins[:, :2])
    with pytest.raises(TypeError, match="uint8"):
        kernels.int4(torch.randn(2, 512), q.view(torch.int8), scales, mins)
    with pytest.raises(TypeError, match="activations"):
        kernels.int4(torch.randn(2, 512).half(), q, scales, mins)


@pytest.mark.parametrize("outlier", [None, 300.0])  # GPT-Neo's residual stream has a few such values
def test_int8_rows_are_more_accurate_than_the_bf16_kernel_they_replace(kernels, outlier):
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (512, 2048), dtype=torch.int8)
    scales, x = torch.rand(512), torch.randn(1, 2048)
    if outlier:
        x[0, 7] = outlier  # its block of 256 is scaled to it: the other 255 values there lose precision
    want = exact(x, q, scales)
    ours = relative_error(kernels.int8(x, q, scales), want)
    theirs = relative_error(torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scales.bfloat16()), want)
    assert ours < (theirs if outlier else theirs / 4)


def test_zero_activations_give_zero_and_the_bias_is_added(kernels):
    q = torch.randint(-127, 128, (5, 256), dtype=torch.int8)
    assert torch.equal(kernels.int8(torch.zeros(2, 256), q, torch.ones(5)), torch.zeros(2, 5))
    assert torch.equal(kernels.int8(torch.zeros(3, 256), q, torch.ones(5), torch.arange(5.0)),
                       torch.arange(5.0).expand(3, 5))


@pytest.mark.parametrize("M", [1, 3])
def test_bf16_activations_give_the_fp32_result_rounded_to_bf16(kernels, M):
    # A quantized model computes in bf16: the kernel reads bf16 x and bias and writes bf16, rounding
    # its fp32 result to nearest even exactly as PyTorch's .bfloat16() does.
    torch.manual_seed(M)
    q = torch.randint(-127, 128, (70, 512), dtype=torch.int8)
    scales, x, bias = torch.rand(70) / 50, torch.randn(M, 512).bfloat16(), torch.randn(70).bfloat16()
    got = kernels.int8(x, q, scales, bias)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, kernels.int8(x.float(), q, scales, bias.float()).bfloat16())


def test_int8_kernel_refuses_what_it_cannot_take(kernels):
    q, s = torch.randint(-127, 128, (4, 320), dtype=torch.int8), torch.rand(4)
    with pytest.raises(RuntimeError, match="refused"):
        kernels.int8(torch.randn(1, 320), q, s)  # K not a multiple of 256
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        kernels.int8(torch.randn(1, 256).half(), q[:, :256], s)
    with pytest.raises(TypeError, match="int8 weights"):
        kernels.int8(torch.randn(1, 256), q[:, :256].to(torch.int16), s)
    # The C code trusts the sizes it is given: shapes that do not fit never reach it.
    with pytest.raises(ValueError, match="do not fit"):
        kernels.int8(torch.randn(1, 512), q[:, :256], s)
    with pytest.raises(ValueError, match="scales"):
        kernels.int8(torch.randn(1, 256), q[:, :256], s[:3])
    with pytest.raises(ValueError, match="bias"):
        kernels.int8(torch.randn(1, 256), q[:, :256], s, torch.zeros(5))


# ---- fp32 ----

@pytest.mark.parametrize("K", [16, 768, 2064])
@pytest.mark.parametrize("M", [1, 2, 4, 5, 7, 8, 9, 16, 17])  # tiles of 4 (AVX2) or 8 (AVX-512) rows, partial ones
@pytest.mark.parametrize("N", [1, 2, 3, 4, 6, 13, 77])  # tiles of 3 weight rows (4 at one row), partial ones
def test_f32_rows_equal_the_exact_product(kernels, M, K, N):
    torch.manual_seed(M * K + N)
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    want = x.double() @ w.double().t()
    got = kernels.f32(x, w)
    assert got.shape == (M, N) and got.dtype == torch.float32
    # fp32 sums of K products: within a few ulps of the largest partial sums.
    bound = 1e-6 * K ** 0.5 * (x.double().abs() @ w.double().abs().t()) + 1e-6
    assert ((got.double() - want).abs() <= bound).all()
    torch.testing.assert_close(kernels.f32(x, w, b), got + b, rtol=0, atol=0)


def test_f32_rows_do_not_depend_on_their_batch_mates(kernels):
    torch.manual_seed(0)
    x, w, b = torch.randn(13, 768), torch.randn(300, 768), torch.randn(300)
    together = kernels.f32(x, w, b)
    for i in range(13):
        assert torch.equal(kernels.f32(x[i : i + 1], w, b)[0], together[i])
        assert torch.equal(kernels.f32(x[: i + 1], w, b)[i], together[i])


def test_f32_kernel_refuses_what_it_cannot_take(kernels):
    with pytest.raises(RuntimeError, match="refused"):
        kernels.f32(torch.randn(2, 24), torch.randn(5, 24))  # K not a multiple of 16
    with pytest.raises(TypeError, match="float32"):
        kernels.f32(torch.randn(2, 32).bfloat16(), torch.randn(5, 32).bfloat16())
    with pytest.raises(ValueError, match="do not fit"):
        kernels.f32(torch.randn(2, 48), torch.randn(5, 32))
    with pytest.raises(ValueError, match="bias"):
        kernels.f32(torch.randn(2, 32), torch.randn(5, 32), torch.zeros(4))
    bias = torch.randn(5, 2)[:, 0]  # not contiguous: copied, and the copy outlives the call
    torch.testing.assert_close(kernels.f32(torch.ones(1, 32), torch.ones(5, 32), bias), 32 + bias[None])


def test_the_avx2_build_has_no_avx512_instruction(tmp_path, monkeypatch):
    # NEOJ_ISA=avx2 on an AVX-512 machine must measure what an AVX2-only CPU would run.
    if "avx2" not in usable_variant_names():
        pytest.skip("this CPU does not run the avx2 build")
    if not shutil.which("objdump"):
        pytest.skip("no objdump to disassemble with")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rowmatmul.load("avx2")
    (lib,) = tmp_path.rglob("rowmatmul-avx2-*.so")
    asm = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "ymm" in asm and "vfmadd" in asm and "vpmaddwd" in asm
    assert "zmm" not in asm and "{%k" not in asm  # no 512-bit registers, no mask registers


# ---- the C check, natively and for ARM64 under qemu-user ----

CHECK = Path(__file__).parent / "rowmatmul_check.c"


def check_command(variant: rowmatmul.Variant, tmp_path: Path) -> list[str]:
    """Compiles tests/rowmatmul_check.c with `variant` (its own flags) and returns how to run it."""
    if variant.arch == rowmatmul.machine():
        cc, run = rowmatmul.compiler(), []
    else:  # ARM64 from x86-64: Debian's cross compiler and qemu-user
        cc, qemu = shutil.which(f"{variant.arch}-linux-gnu-gcc"), shutil.which(f"qemu-{variant.arch}")
        if not (cc and qemu):
            pytest.skip(f"needs {variant.arch}-linux-gnu-gcc and qemu-{variant.arch} "
                        "(Debian: gcc-aarch64-linux-gnu qemu-user)")
        run = [qemu, "-cpu", "max"]
    if not cc:
        pytest.skip("no C compiler")
    flags = [f for f in variant.build_flags() if f not in ("-shared", "-fPIC")]
    kernel, check, exe = tmp_path / "k.o", tmp_path / "c.o", tmp_path / "check"
    subprocess.run([cc, *flags, "-c", "-o", str(kernel), str(rowmatmul.CSRC / variant.source)], check=True)
    # -O1: gcc 12's aarch64 vectorizer crashes on the check's reference loops at -O3 (the kernel is -O3).
    subprocess.run([cc, "-O1", "-std=gnu11", *variant.flags, "-c", "-o", str(check), str(CHECK)], check=True)
    static = ["-static"] if run else []
    subprocess.run([cc, *static, "-fopenmp", "-o", str(exe), str(check), str(kernel), "-lm"], check=True,
                   capture_output=True)
    return [*run, str(exe)]


@pytest.mark.parametrize("name", [v.name for v in rowmatmul.VARIANTS])
def test_the_c_check_passes_for_each_variant(name, tmp_path):
    # fp64 references over tile remainders, batch independence and bf16 rounding, in C: the way the ARM64
    # builds are tested on an x86-64 machine (qemu-user emulates NEON and the dot product instructions).
    variant = rowmatmul.BY_NAME[name]
    if variant.arch == rowmatmul.machine() and variant not in rowmatmul.usable_variants():
        pytest.skip(f"this CPU (or NEOJ_ISA) does not run {name}")
    if variant.arch not in (rowmatmul.machine(), "aarch64"):
        pytest.skip(f"no emulator for {variant.arch} here")
    out = subprocess.run(check_command(variant, tmp_path), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == f"{name} ok", out.stdout + out.stderr


def test_the_avx2_activation_quantizer_gives_the_c_ones_values(tmp_path):
    """quantize_row has an AVX2 form (x86 builds) and a C form (ARM64): the same 15-bit values, scales and
    sums bit for bit, NaNs, infinities, zeros and rounding ties included, from fp32 and bf16 rows."""
    if rowmatmul.machine() != "x86_64" or "avx2" not in rowmatmul.cpu_features():
        pytest.skip("needs an x86-64 CPU with AVX2")
    cc = rowmatmul.compiler()
    if not cc:
        pytest.skip("no C compiler")
    source = Path(__file__).parent / "quantize_check.c"
    hashes = []
    for name, flags in (("c", []), ("avx2", ["-mavx2", "-mfma"])):
        exe = tmp_path / name
        subprocess.run([cc, "-O3", "-std=gnu11", *flags, "-o", str(exe), str(source), "-lm"], check=True)
        hashes.append(subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout)
    assert hashes[0] == hashes[1] and len(hashes[0].strip()) == 16


# ---- choosing a variant ----

X86_AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
X86_AVX512 = X86_AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


@pytest.mark.parametrize("features,arch,want", [
    (X86_AVX2, "x86_64", ["avx2"]),
    (X86_AVX2 - {"fma"}, "x86_64", []),  # AVX2 without FMA (a few VIA/Zhaoxin parts): PyTorch's kernels
    (X86_AVX512, "x86_64", ["avx512", "avx2"]),
    (X86_AVX512 | {"avx512_vnni"}, "x86_64", ["avx512_vnni", "avx512", "avx2"]),
    (X86_AVX512 - {"avx512bw"}, "x86_64", ["avx2"]),  # Knights Landing: AVX-512F without BW
    (frozenset({"fp", "asimd"}), "aarch64", ["neon"]),
    (frozenset({"fp", "asimd", "asimddp"}), "aarch64", ["neon_dotprod", "neon"]),
    (frozenset(), "x86_64", []),
])
def test_the_best_variant_the_cpu_features_allow_comes_first(features, arch, want):
    assert [v.name for v in rowmatmul.supported_variants(features, arch)] == want


@pytest.mark.parametrize("isa", ["avx2", "none", "bogus"])
def test_neoj_isa_caps_the_variant_chosen(isa, tmp_path):
    native = [v.name for v in rowmatmul.supported_variants()]
    code = "from neoj import rowmatmul; print(rowmatmul.variant_name())"
    got = run_python(code, {"NEOJ_ISA": isa}, tmp_path)
    if isa == "none" or not native:
        assert got == "none"
    elif isa == "bogus":  # a typo is ignored (with a warning), not a silent slowdown
        assert got == native[0]
    else:
        assert got == ("avx2" if "avx2" in native else "none")


def test_a_variant_that_fails_to_build_gives_way_to_the_next(monkeypatch, caplog):
    usable = rowmatmul.candidate_variants()
    if not usable:
        pytest.skip("no kernel variant for this CPU")
    real = rowmatmul.build

    def failing_top(variant):
        if variant is usable[0]:
            raise rowmatmul.BuildError("simulated compiler without these flags")
        return real(variant)

    monkeypatch.setattr(rowmatmul, "build", failing_top)
    with caplog.at_level(logging.WARNING, logger="neoj.rowmatmul"):
        chosen = rowmatmul.select()
    assert "simulated compiler" in caplog.text
    # The next lower variant, or none (PyTorch's kernels) where the failing one was the only one.
    assert (chosen.name if chosen else None) == (usable[1].name if len(usable) > 1 else None)


# ---- building safely ----

def some_variant():
    usable = rowmatmul.usable_variants()
    if not usable:
        pytest.skip("no kernel variant for this CPU")
    return usable[-1]  # the cheapest to build


def test_the_cache_directory_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    rowmatmul.build(some_variant())
    cache = tmp_path / "c" / "neoj" / "kernels"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (lib,) = cache.glob("*.so")
    assert stat.S_IMODE(lib.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("how", ["world-writable", "group-writable-parent", "not-ours"])
def test_an_unsafe_cache_is_not_used(how, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "neoj" / "kernels"
    cache.mkdir(parents=True, mode=0o700)
    if how == "world-writable":
        cache.chmod(0o777)
    elif how == "group-writable-parent":
        (tmp_path / "neoj").chmod(0o775)  # whoever writes it can swap in their own kernels directory
    else:
        real_uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real_uid + 4242)  # as another user would see it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="neoj.rowmatmul_build"):
        lib, built = rowmatmul.build(some_variant())
    assert built and "not private" in caplog.text
    assert not list(cache.glob("*.so"))  # built in a private temporary directory instead
    k = rowmatmul.Kernels(some_variant(), lib)
    torch.testing.assert_close(k.f32(torch.ones(1, 16), torch.ones(2, 16)), torch.full((1, 2), 16.0))


def build_in_another_process(variant: str, cache: Path) -> Path:
    """Builds `variant` into cache from a fresh Python, so this one never maps it; returns the library."""
    run_python(f"from neoj import rowmatmul; rowmatmul.load({variant!r})", {}, cache)
    (lib,) = (cache / "neoj" / "kernels").glob("*.so")
    return lib


def test_a_library_others_can_write_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    variant = some_variant()
    lib = build_in_another_process(variant.name, tmp_path)
    lib.chmod(0o666)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, built = rowmatmul.build(variant)
    assert built and stat.S_IMODE(lib.stat().st_mode) == 0o700


def test_a_library_that_does_not_load_is_rebuilt_once(tmp_path, monkeypatch, caplog):
    variant = some_variant()
    lib = build_in_another_process(variant.name, tmp_path)
    lib.write_bytes(b"not an ELF file")  # a disk error, an interrupted copy of the cache, ...
    lib.chmod(0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="neoj.rowmatmul_build"):
        loaded, built = rowmatmul.build(variant)
    assert built and "rebuilding" in caplog.text
    assert rowmatmul.Kernels(variant, loaded).f32(torch.ones(1, 16), torch.ones(1, 16)).item() == 16.0


def test_a_library_that_is_not_a_kernel_library_is_rebuilt(tmp_path, monkeypatch, caplog):
    # A valid shared library without the kernels' symbols (a stale or foreign file under the same name):
    # it loads, fails its check, is unloaded, and the rebuilt library at the same path is what runs.
    variant = some_variant()
    lib = build_in_another_process(variant.name, tmp_path)
    stub = tmp_path / "stub.c"
    stub.write_text("int neoj_not_a_kernel = 1;\n")
    subprocess.run([rowmatmul.compiler(), "-shared", "-fPIC", "-o", str(lib), str(stub)], check=True)
    lib.chmod(0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="neoj.rowmatmul_build"):
        loaded, built = rowmatmul.build(variant)
    assert built and "not a neoj kernel library" in caplog.text
    assert rowmatmul.Kernels(variant, loaded).f32(torch.ones(1, 16), torch.ones(1, 16)).item() == 16.0


def test_concurrent_processes_build_once(tmp_path):
    # Four processes start on an empty cache at once: one compiles, the others wait on the lock and load it.
    variant = some_variant().name
    code = (f"from neoj import rowmatmul; k = rowmatmul.load({variant!r}); "
            "import torch; assert k.f32(torch.ones(1, 16), torch.ones(1, 16)).item() == 16.0; print(k.built)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["False", "False", "False", "True"]
    assert len(list((tmp_path / "neoj" / "kernels").glob("*.so"))) == 1
    assert not list((tmp_path / "neoj" / "kernels").glob("tmp*"))  # no temporary file left behind


# ---- without the kernels ----

FALLBACK_ENVS = [{"NEOJ_COMPILE": "0"}, {"NEOJ_ISA": "none"}, {"CC": "/nonexistent/cc"}, {"CC": "/bin/false"}]
FALLBACK_IDS = ["disabled", "isa-none", "no-compiler", "failing-compiler"]


@pytest.mark.parametrize("env", FALLBACK_ENVS, ids=FALLBACK_IDS)
def test_without_the_kernel_int8_layers_fall_back_to_pytorch(env, tmp_path):
    # A fresh cache directory, so a library built earlier cannot hide a failing compiler.
    code = ("import torch; from neoj import rowmatmul; from neoj.quantize import *\n"
            "torch.manual_seed(0); spec = QuantSpec('int8'); w = torch.randn(8, 256)\n"
            "layer = QuantLinear(quantize_weight(w, spec), spec, None)\n"
            "x = torch.randn(1, 256); want = x.double() @ dequantize(quantize_weight(w, spec), spec).double().t()\n"
            "error = (layer(x).double() - want).norm() / want.norm()\n"
            "assert error < 5e-3, error  # bf16 activations on PyTorch's path\n"
            "print(rowmatmul.int8_available(), rowmatmul.variant_name())")
    assert run_python(code, env, tmp_path) == "False none"
    assert not list(tmp_path.rglob("*.so"))  # and no half-built library left behind


@pytest.mark.parametrize("env", FALLBACK_ENVS, ids=FALLBACK_IDS)
def test_without_the_kernel_fp32_decode_layers_fall_back_to_onednn(env, tmp_path):
    code = ("import torch; from neoj import rowmatmul; from neoj.kernels import DecodeLinear\n"
            "layer = DecodeLinear(64, 40); x = torch.randn(8, 64)\n"
            "with torch.inference_mode(): got = layer(x)\n"
            "torch.testing.assert_close(got, x @ layer.weight.t() + layer.bias)\n"
            "print(rowmatmul.f32_available())")
    assert run_python(code, env, tmp_path) == "False"


@pytest.mark.parametrize("rows", [1, 4, 16, 17, 40])
def test_int8_layers_with_256_multiple_inputs_match_their_dequantized_weight(rows):
    torch.manual_seed(rows)
    spec = QuantSpec("int8")
    w, b = torch.randn(40, 256) * 0.1, torch.randn(40)
    layer = QuantLinear(quantize_weight(w, spec), spec, torch.nn.Parameter(b))
    x = torch.randn(rows, 256)
    want = x.double() @ dequantize(quantize_weight(w, spec), spec).double().t() + b.double()
    assert relative_error(layer(x), want) < 5e-3  # bf16 activations on PyTorch's paths, 15 bits on neoj's
