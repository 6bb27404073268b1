"""The one place that decides which kernel computes a linear layer: DecodeLinear (kernels.py, fp32 and
half-precision weights) and QuantLinear (quantize.py, int8 and int4 weights) both call `run`.

`RULES` is the table: for each kind of weight, the paths in the order they are tried, each with the
rows, widths, devices and kernel ISA variants (neoj.rowmatmul's, chosen by CPU features) it applies to
and a one-line reason pointing at the BENCHMARKS.md section that measured it. A call takes the first
path whose rule matches. The last rule of each kind is `final`: it always applies and is never turned
off (PyTorch's reference where there is one; the packed int4 kernels, whose weights exist in no other
form). A path that raises is turned off for the rest of the process (with a warning) and the call goes
on to the next path: one failure disables only the path that failed. Decisions are cached per call
shape, so a decode step pays one dict lookup per layer.

A layer given to `run` has `in_features`, `out_features`, `bias`, `allow_compile`, and its weights:
`weight` (DecodeLinear); `qweight`, `scales` (bf16), `scales_fp32` (int8) or `scales_zeros` and
`spec.group_size` (int4 packed), or `dequantized_weight()` (int4 in the portable form), as QuantLinear holds them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import gpu_kernels, rowmatmul

log = logging.getLogger(__name__)

_BLOCKS = 4  # row blocks for the fp32 matrix-vector product: enough for up to 4 cores to share


@dataclass(frozen=True)
class Rule:
    """When one path applies: every condition must hold. `isa` lists the rowmatmul variants it is for."""

    path: str
    kind: str  # "f32", "half" (DecodeLinear) or QuantLinear.kernel: "int8pack", "int4pack_cpu", ...
    reason: str
    device: str = "cpu"
    min_rows: int = 1
    max_rows: int | None = None
    min_in: int = 0
    max_in: int | None = None
    max_elements: int | None = None  # rows * in_features: the activations the kernel keeps close
    min_weight_bytes: int = 0
    in_multiple: int = 1
    x_dtypes: tuple = ()  # activation dtypes it takes; () = any
    isa: tuple = ()  # rowmatmul variants; () = not a rowmatmul path
    compiled: bool = False  # a TorchInductor kernel: needs layer.allow_compile and NEOJ_COMPILE != 0
    final: bool = False  # the kind's last resort: matches any call and is never turned off

    def matches(self, call: "Call") -> bool:
        """Returns True when this rule's conditions all hold for `call`."""
        if self.final:
            return True
        return (call.device == self.device
                and self.min_rows <= call.rows and (self.max_rows is None or call.rows <= self.max_rows)
                and self.min_in <= call.in_features and (self.max_in is None or call.in_features <= self.max_in)
                and (self.max_elements is None or call.rows * call.in_features <= self.max_elements)
                and call.weight_bytes >= self.min_weight_bytes and call.in_features % self.in_multiple == 0
                and (not self.x_dtypes or call.x_dtype in self.x_dtypes)
                and (not self.isa or call.isa in self.isa)
                and (not self.compiled or (call.allow_compile and compile_allowed())))


class Call(NamedTuple):
    """What the choice depends on: one layer call's shape, dtypes, device and this process's kernels.
    (A named tuple: made and hashed on every layer call, so it must be cheap.)"""

    kind: str
    device: str
    rows: int
    in_features: int
    weight_bytes: int
    x_dtype: torch.dtype
    allow_compile: bool
    isa: str


_FP32 = (torch.float32,)
_FP32_BF16 = (torch.float32, torch.bfloat16)
_AVX512 = ("avx512", "avx512_vnni")
_NO_VNNI = ("avx2", "avx512", "neon", "neon_dotprod")
_NEON = ("neon", "neon_dotprod")
# Section names in BENCHMARKS.md that the reasons point to.
_F32_BENCH = "BENCHMARKS.md, fp32 few-row kernel (bench/bench_f32_kernel.py)"
_I8_BENCH = "BENCHMARKS.md, int8 decode kernel (bench/bench_int8_kernel.py)"
_PORTABLE_BENCH = "BENCHMARKS.md, portable decode (bench/bench_portable.py)"
_QUANT_BENCH = "BENCHMARKS.md, quantization (bench/bench_quant.py)"
_GPU_BENCH = "BENCHMARKS.md, GPU decode (bench/bench_gpu.py)"
_I4_BENCH = "BENCHMARKS.md, int4 decode kernel (bench/bench_int4_kernel.py)"
# Where CPU int4 layers keep neoj's portable form for its kernel (the rowmatmul_int4 rule) instead of
# tinygemm's packed form, which with AVX-512 (its bf16 kernels) is as fast or faster at 1-4 rows: neoj's int4
# there is 0.6-1.2x tinygemm, 1.1-1.4x only at 8-16 rows of the wider layers (BENCHMARKS.md, int4 decode kernel).
INT4_KERNEL_ISAS = ("avx2",)

RULES: tuple[Rule, ...] = (
    # ---- fp32 weights (DecodeLinear) ----
    Rule("rowmatmul_f32", "f32", max_rows=16, in_multiple=16, isa=_AVX512,
         reason="1-16 rows, 16 lanes: at 2-16 rows the kernel keeps the FMAs busy and prefetches weights where oneDNN "
                "reads 7-12 GB/s (past 16 rows at parity); at one row it reads 1.01-1.24x the blocked product at every "
                "GPT-Neo/GPT-J width (EPYC, 0.85-0.98 of a plain read), and without VNNI (Skylake-SP) the blocked "
                f"product halves GPT-J-arch fp32 decode ({_F32_BENCH}; {_PORTABLE_BENCH})"),
    Rule("rowmatmul_f32", "f32", max_rows=16, in_multiple=16, isa=("avx2",),
         reason="1-16 rows, AVX2: 1.0-1.9x oneDNN (held to AVX2) at 9-16 rows of GPT-Neo/GPT-J layers; past 16 "
                f"rows at parity or below ({_F32_BENCH}, its avx2 section)"),
    Rule("rowmatmul_f32", "f32", max_rows=8, in_multiple=16, isa=_NEON,
         reason="1-8 rows, NEON (as AVX2's 8 lanes, not measured on ARM past 8 rows): at or above oneDNN and the "
                f"blocked product at GPT-Neo/GPT-J widths (rowmatmul per ISA, {_PORTABLE_BENCH})"),
    Rule("blocked_matvec", "f32", max_rows=1,
         reason="one row: MKL's GEMV streams on one core (9-13 GB/s); 4 row blocks as a batched matmul use all "
                f"cores (25-31) ({_F32_BENCH})"),
    Rule("onednn_linear", "f32", max_rows=64,
         reason=f"2-64 rows: MKL packs the weight on every call, oneDNN reads it as it is: 1.3-2x ({_F32_BENCH})"),
    Rule("linear", "f32", final=True, reason="reference: F.linear (prefill, training, other devices)"),
    # ---- bf16 / fp16 weights (DecodeLinear) ----
    Rule("compiled_matvec", "half", max_rows=1, compiled=True,
         reason="one row: oneDNN reaches ~10 GB/s, an Inductor reduction with fp32 sums 20+; compiling costs "
                f"seconds per process, so only where the model allows it (large weights) ({_QUANT_BENCH})"),
    Rule("linear", "half", final=True, reason="reference: F.linear"),
    # ---- int8 weights (QuantLinear "int8pack") ----
    Rule("rowmatmul_int8", "int8pack", max_elements=8192, in_multiple=rowmatmul.BLOCK, x_dtypes=_FP32_BF16,
         isa=("avx512_vnni",),
         reason="activations within L1 (rows x in <= 8192, 16 KB at 15 bits): VNNI 15-29 GB/s against "
                f"_weight_int8pack_mm's 9-17; wider, int8pack wins at 4+ rows ({_I8_BENCH})"),
    Rule("rowmatmul_int8", "int8pack", min_rows=17, max_rows=512, in_multiple=rowmatmul.BLOCK, x_dtypes=_FP32_BF16,
         isa=("avx2",),
         reason="17-512 rows, AVX2 (prefill): GPT-J-arch prompts of 32 / 128 / 512 tokens 0.26 / 1.09 / 4.07 s against "
                "0.46 / 2.00 / 5.72 through _weight_int8pack_mm and dequantizing (A/B at 2 threads; first-token "
                f"column of {_PORTABLE_BENCH})"),
    Rule("rowmatmul_int8", "int8pack", max_rows=16, in_multiple=rowmatmul.BLOCK, x_dtypes=_FP32_BF16, isa=_NO_VNNI,
         reason="1-16 rows without VNNI: 16-bit multiply-adds on 15-bit activations, 1.0-2.3x _weight_int8pack_mm; "
                "fbgemm's dynamic int8 is 0.9-1.6x at 1 row and 1.6-2.2x at 8, but rounds activations to 7 bits per "
                f"call: ~300x the error, and a row's result depends on its batch ({_I8_BENCH}, avx2)"),
    Rule("compiled_int8_matvec", "int8pack", max_rows=1, min_weight_bytes=16 << 20, max_in=2048, compiled=True,
         reason="one row, weights >= 16 MB (out of cache) and <= 2048 wide: 22 GB/s against int8pack's 9-16; "
                f"smaller weights (in cache) and wider inputs are faster in int8pack ({_QUANT_BENCH})"),
    Rule("int8pack", "int8pack", max_rows=63,
         reason="below 64 rows: _weight_int8pack_mm with bf16 activations (fp32 ones run at 1-2 GB/s) "
                f"({_QUANT_BENCH})"),
    Rule("triton_int8", "int8pack", device="cuda", max_rows=gpu_kernels.MAX_ROWS,
         reason="CUDA, 1-16 rows: neoj's Triton kernel reads each int8 weight once; dequantizing first moves 5 "
                f"bytes per weight ({_GPU_BENCH})"),
    Rule("int8pack_cuda", "int8pack", device="cuda", max_rows=gpu_kernels.MAX_ROWS,
         reason=f"CUDA without Triton: _weight_int8pack_mm where this torch has it ({_GPU_BENCH})"),
    Rule("int8_dequant", "int8pack", final=True,
         reason="reference, and from 64 rows (prefill): dequantize and one matmul is faster, in bf16, or in fp32 "
                f"where the activations are fp32 (2x a 128-token prompt there) ({_QUANT_BENCH}; {_PORTABLE_BENCH})"),
    # ---- int4 weights: neoj's portable form where its kernel is the measured faster path (INT4_KERNEL_ISAS),
    # else packed for tinygemm at load, so its kernel is the only path ----
    Rule("rowmatmul_int4", "dequantize", max_rows=512, in_multiple=rowmatmul.BLOCK, x_dtypes=_FP32_BF16,
         isa=INT4_KERNEL_ISAS,
         reason="AVX2: the nibbles multiplied as bytes with 8-bit activations per group; one row 1.6-4.2x tinygemm "
                "(which converts every weight to float) and 1.6-2x neoj's int8 at GPT-Neo-1.3B/GPT-J widths, 8 rows "
                "1.2-2.3x tinygemm and 0.9-1.3x int8 there; GPT-J-arch prefill of 128 / 512 tokens (A/B at 2 threads, "
                "AVX2) 0.8 / 3.7 s against tinygemm's 1.6 / 6.3 (dequantizing's fixed cost, 4.1 / 7.4 s against the "
                f"previous kernel's 1.3 / 5.9, pays off only past that) ({_I4_BENCH}; first-token column of "
                f"{_PORTABLE_BENCH})"),
    Rule("int4pack_cpu", "int4pack_cpu", final=True,
         reason=f"tinygemm's CPU port, 15 GB/s of packed weights at batch 1 ({_QUANT_BENCH})"),
    Rule("int4pack_cuda", "int4pack_cuda", final=True, reason="tinygemm on CUDA"),
    Rule("int4_dequant", "dequantize", final=True,
         reason="dequantize on the fly (a torch build or shape without the int4 kernel)"),
    # ---- autograd, or activations in another dtype than the weights: PyTorch only ----
    Rule("int8_dequant", "int8_grad", final=True,
         reason="the kernels have no backward: the dequantized weight has"),
    Rule("linear", "reference", final=True, reason="F.linear"),
)


# ---------------------------------------------------------------------------------------------
# Implementations: (layer, x (rows, in)) -> (rows, out) with the bias added, in the layer's output dtype


def blocked_matvec(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Returns w @ x + bias for one fp32 row x (in,), as a batched matmul over row blocks of w."""
    out, inn = w.shape
    main = out - out % _BLOCKS
    # A column with leading dimension `inn` (not 1), so the BLAS batched GEMM accepts it as is;
    # with ld=1 torch takes a slow non-BLAS fallback.
    col = x.reshape(1, 1, inn).transpose(1, 2).expand(_BLOCKS, inn, 1)
    y = torch.bmm(w[:main].view(_BLOCKS, main // _BLOCKS, inn), col).view(main)  # (blocks, out/blocks, 1)
    if main < out:  # e.g. GPT-Neo's 50257-row head: the last rows on their own
        y = torch.cat((y, w[main:] @ x.reshape(inn)))
    return y if bias is None else y + bias


_compiled: dict[str, Callable] = {}


def keep_inductor_cache_per_capability() -> None:
    """Points TorchInductor at a cache of its own when ATEN_CPU_CAPABILITY caps PyTorch's CPU code (e.g. avx2 on
    an AVX-512 CPU, as bench_portable and the AVX2 test runs do) and the user has not chosen a cache directory.
    Inductor's cache key leaves that setting out, so a capped process would load kernels compiled uncapped:
    measured here, wrong products (and the other way round, a crash)."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # PyTorch writes its default here once it has used it
    if capability and chosen in (None, _inductor_default_cache_dir()):
        directory = rowmatmul.inductor_cache_dir(capability)
        if directory is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)


def _inductor_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: only an unset variable counts as PyTorch's default
        return None
    return os.path.abspath(default_cache_dir())


def compiled(name: str) -> Callable:
    """Returns the TorchInductor reduction `name` ("matvec", "matvec_bias", "int8_matvec"), compiled once
    per process (and once per weight shape and dtype on first call)."""
    if not _compiled:
        keep_inductor_cache_per_capability()
        import torch._dynamo

        # A few kernels per model, more with several models in one process. Past the limit dynamo would
        # silently run the uncompiled reduction, which is far slower.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)

        # x (1, in), w (out, in) -> (out,); products and sums in fp32 whatever the storage dtype.
        def matvec(x, w):
            return (w.float() * x.float()).sum(-1).to(w.dtype)

        def matvec_bias(x, w, b):
            return ((w.float() * x.float()).sum(-1) + b.float()).to(w.dtype)

        def int8_matvec(x, q, scales):
            return (q.float() * x.float()).sum(-1) * scales

        for fn in (matvec, matvec_bias, int8_matvec):
            _compiled[fn.__name__] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def _with_bias(y: torch.Tensor, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Adds the layer's bias to y and returns it in `dtype`, as QuantLinear always did."""
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.to(dtype)


def _rowmatmul_f32(layer, x):
    return f32_product(layer)(x)


def bound_product(layer: nn.Module, slot: str, tensors: tuple, bind: Callable[[], Callable]):
    """Returns the C kernel's product kept on the layer under `slot`, made by bind() on the first call and again
    whenever the kept one no longer holds `tensors` (its `holds`: one of them replaced, or the bias changed)."""
    product = layer.__dict__.get(slot)
    if product is None or not product.holds(*tensors):
        product = layer.__dict__[slot] = bind()
    return product


def f32_product(layer: nn.Module) -> rowmatmul.F32Product:
    """Returns the C kernel's product by an fp32 layer's weight and bias (see bound_product)."""
    weight, bias = weight_of(layer), bias_of(layer)
    return bound_product(layer, "_f32_product", (weight, bias), lambda: rowmatmul.kernels().bind_f32(weight, bias))


def _blocked_matvec(layer, x):
    return blocked_matvec(x, weight_of(layer), bias_of(layer)).view(1, -1)


def _onednn_linear(layer, x):
    return torch.ops.mkldnn._linear_pointwise(x, weight_of(layer), bias_of(layer), "none", [], "")


def _linear(layer, x):
    return F.linear(x, layer.weight, layer.bias)


def _compiled_matvec(layer, x):
    if layer.bias is None:
        return compiled("matvec")(x, layer.weight).view(1, -1)
    return compiled("matvec_bias")(x, layer.weight, layer.bias).view(1, -1)


def _rowmatmul_int8(layer, x):
    # The kernel reads x and the bias and writes y in the model's dtype: no conversions around it.
    return int8_product(layer)(x)


def int8_product(layer: nn.Module) -> rowmatmul.Int8Product:
    """Returns the C kernel's product by an int8 layer's weights, made on its first call and kept on the
    layer until one of its tensors is replaced (or the bias changed)."""
    qweight, scales, bias = weight_of(layer), layer.scales_fp32, bias_of(layer)
    return bound_product(layer, "_int8_product", (qweight, scales, bias),
                         lambda: rowmatmul.kernels().bind_int8(qweight, scales, bias))


def _compiled_int8_matvec(layer, x):
    return _with_bias(compiled("int8_matvec")(x, layer.qweight, layer.scales_fp32).view(1, -1), layer, x.dtype)


def _triton_int8(layer, x):
    b = None if layer.bias is None else layer.bias.to(x.dtype)
    return gpu_kernels.int8_matmul(x, layer.qweight, layer.scales_fp32, b)


def _int8pack(layer, x):
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), layer.qweight, layer.scales)
    return _with_bias(y, layer, x.dtype)


def _int8_dequant(layer, x):
    # fp32 activations (CPUs without bf16 instructions) multiply in fp32: bf16 there is emulated, 3x slower.
    if x.dtype == torch.float32:
        return _with_bias(F.linear(x, layer.qweight.to(torch.float32)) * layer.scales_fp32, layer, x.dtype)
    y = F.linear(x.to(torch.bfloat16), layer.qweight.to(torch.bfloat16)) * layer.scales
    return _with_bias(y, layer, x.dtype)


def _int4pack_cpu(layer, x):
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), layer.qweight, layer.spec.group_size,
                                                   layer.scales_zeros)
    return _with_bias(y[:, : layer.out_features], layer, x.dtype)


def _int4pack_cuda(layer, x):
    y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), layer.qweight, layer.spec.group_size,
                                           layer.scales_zeros)
    return _with_bias(y[:, : layer.out_features], layer, x.dtype)


def _rowmatmul_int4(layer, x):
    qweight, scales, mins, bias = weight_of(layer), layer.scales, layer.mins, bias_of(layer)
    return bound_product(layer, "_int4_product", (qweight, scales, bias, mins),
                         lambda: rowmatmul.kernels().bind_int4(qweight, scales, mins, bias))(x)


_DEQUANT_ROWS = 4096  # output rows dequantized at a time: GPT-J-6B's head at once would be an 825 MB fp32 copy


def _int4_dequant(layer, x):
    parts = [F.linear(x, layer.dequantized_weight(slice(start, start + _DEQUANT_ROWS)).to(x.dtype))
             for start in range(0, layer.out_features, _DEQUANT_ROWS)]
    return _with_bias(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), layer, x.dtype)


def int4_kernel_on_cpu() -> bool:
    """True when CPU int4 layers should keep neoj's portable form: neoj's int4 kernel is built here and is the
    measured faster path for this CPU's variant (INT4_KERNEL_ISAS)."""
    return rowmatmul.int4_available() and rowmatmul.variant_name() in INT4_KERNEL_ISAS


IMPLS: dict[str, Callable] = {
    "rowmatmul_f32": _rowmatmul_f32, "blocked_matvec": _blocked_matvec, "onednn_linear": _onednn_linear,
    "linear": _linear, "compiled_matvec": _compiled_matvec, "rowmatmul_int8": _rowmatmul_int8,
    "compiled_int8_matvec": _compiled_int8_matvec, "int8pack": _int8pack, "int8pack_cuda": _int8pack, "triton_int8": _triton_int8,
    "int8_dequant": _int8_dequant, "int4pack_cpu": _int4pack_cpu, "int4pack_cuda": _int4pack_cuda,
    "int4_dequant": _int4_dequant, "rowmatmul_int4": _rowmatmul_int4,
}


# ---------------------------------------------------------------------------------------------
# Choosing, running, disabling


_disabled: set[str] = set()
_plans: dict[Call, tuple[str, ...]] = {}
_generation = [0]  # bumped whenever _plans is cleared, so plans remembered on layers are dropped too


def compile_allowed() -> bool:
    """False when NEOJ_COMPILE=0: no TorchInductor kernels (nor C kernels: see neoj.rowmatmul)."""
    return os.environ.get("NEOJ_COMPILE", "1") != "0"


def plan(call: Call) -> tuple[str, ...]:
    """Returns the paths to try for `call`, in order: every enabled matching rule, the reference last."""
    if call not in _plans:
        names: list[str] = []
        for rule in RULES:
            if rule.kind == call.kind and rule.matches(call) and rule.path not in names and (
                    rule.path not in _disabled or rule.final):
                names.append(rule.path)
                if rule.final:  # nothing after it is reached
                    break
        _plans[call] = tuple(names)
    return _plans[call]


def disable(path: str, exc: BaseException | None = None) -> None:
    """Turns `path` off for the rest of the process (not the reference paths, which always run)."""
    log.warning("linear kernel %s failed (%s); using the next one for the rest of this process", path, exc)
    _disabled.add(path)
    _forget_plans()


def reset() -> None:
    """Re-enables every path and forgets the cached choices (tests, or after changing NEOJ_COMPILE)."""
    _disabled.clear()
    _forget_plans()


def _forget_plans() -> None:
    _plans.clear()
    _generation[0] += 1


def disabled() -> frozenset:
    """Returns the paths turned off in this process."""
    return frozenset(_disabled)


def kind_of(layer: nn.Module, x: torch.Tensor) -> str:
    """Returns the rule kind for a layer call: its QuantLinear kernel, or "f32"/"half" for plain weights;
    "reference" when only F.linear is right (autograd, dtype mismatch)."""
    kernel = getattr(layer, "kernel", None)
    if kernel is not None:
        return "int8_grad" if kernel == "int8pack" and x.requires_grad and torch.is_grad_enabled() else kernel
    w = layer.weight
    if x.dtype != w.dtype or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
        return "reference"
    return "f32" if w.dtype == torch.float32 else "half"


def weight_of(layer: nn.Module) -> torch.Tensor:
    """Returns the layer's weight tensor: a QuantLinear's `qweight`, else `weight`.

    Read from the module's tensor dicts where they are: nn.Module's attribute lookup for a buffer or
    parameter costs microseconds, and a decode step reads each layer's tensors on every call."""
    w = layer._buffers.get("qweight")
    if w is None:
        w = layer._parameters.get("weight")
    if w is None:
        w = layer.qweight if hasattr(layer, "qweight") else layer.weight
    return w


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """Returns the layer's bias (None without one), read as weight_of reads the weight."""
    params = layer._parameters
    return params["bias"] if "bias" in params else getattr(layer, "bias", None)


def describe(layer: nn.Module, x: torch.Tensor) -> Call:
    """Returns the Call for layer applied to x (rows, in)."""
    kind = kind_of(layer, x)
    weight = weight_of(layer)
    isa = rowmatmul.variant_name() if x.device.type == "cpu" and kind in ("f32", "int8pack", "dequantize") else "none"
    return Call(kind, x.device.type, x.shape[0], layer.in_features, weight.numel() * weight.element_size(),
                x.dtype, bool(getattr(layer, "allow_compile", False)), isa)


def layer_plan(layer: nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    """Returns plan(describe(layer, x)), remembered on the layer for calls without autograd (decoding calls
    each layer once per token, and describing a call cost as much as a small layer's product). The
    memory is dropped when the choices may change (`disable`, `reset`) or the layer's weight is replaced."""
    if torch.is_grad_enabled():  # autograd decides the kind (kind_of): describe every call
        return plan(describe(layer, x))
    weight = weight_of(layer)
    memory = layer.__dict__.get("_linear_plans")
    if memory is None or memory[0] != _generation[0] or memory[1] is not weight:
        memory = layer.__dict__["_linear_plans"] = (_generation[0], weight, {})
    key = (x.shape[0], x.dtype, x.device, weight.dtype)
    paths = memory[2].get(key)
    if paths is None:
        paths = memory[2][key] = plan(describe(layer, x))
    return paths


def forget(layer: nn.Module) -> None:
    """Drops what `run` remembered on the layer (its plans, its kernel product and the tensors they keep),
    e.g. before the layer's tensors move to another device or dtype."""
    layer.__dict__.pop("_linear_plans", None)
    layer.__dict__.pop("_int8_product", None)
    layer.__dict__.pop("_f32_product", None)
    layer.__dict__.pop("_int4_product", None)


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Returns layer(x) for x (rows, in_features) through the first path of the plan that does not fail."""
    x = x.contiguous()  # e.g. the last position of each row after a prefill: tinygemm refuses strided rows
    paths = layer_plan(layer, x)
    for path in paths[:-1]:
        try:
            return IMPLS[path](layer, x)
        except Exception as exc:  # no C++ compiler for Inductor, a torch build without the op, ...
            disable(path, exc)
    return IMPLS[paths[-1]](layer, x)


def prepare(model: nn.Module) -> None:
    """Builds what the model's CPU linear layers will use (the C kernels) now, at load time, so the
    compiler never runs inside a request."""
    for m in model.modules():
        int8 = getattr(m, "kernel", None) == "int8pack"  # a QuantLinear with int8 weights
        f32 = isinstance(m, nn.Linear) and hasattr(m, "allow_compile") and m.weight.dtype == torch.float32
        w = m.qweight if int8 else m.weight if f32 else None  # f32: a DecodeLinear
        if w is not None and w.device.type == "cpu":
            rowmatmul.prepare()
            return
