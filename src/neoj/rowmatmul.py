"""Few-row matrix products for CPU decoding (csrc/rowmatmul_*.c): int8 weights with 15-bit activations, int4
weights in neoj's portable form with 8-bit activations per weight group (x86 builds), and fp32 weights (a
server's decode batch, or one row of a wide layer).

Each process uses the best ISA variant this CPU supports that builds and loads (see neoj.rowmatmul_build
for the variants, NEOJ_ISA, and how libraries are built and cached safely); a variant that fails to build
or load is skipped for the next lower one. With none, `int8_available()` and `f32_available()` are False
and callers keep PyTorch's kernels. Call `prepare()` when a model is loaded so the compiler runs then, not
inside the first request.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading

import torch

from .rowmatmul_build import (BY_NAME, CSRC, VARIANTS, BuildError, Variant, build, candidate_variants,
                              compiler, cpu_features, inductor_cache_dir, machine, supported_variants,
                              usable_variants)

log = logging.getLogger(__name__)

BLOCK = 256  # activations are scaled per block of this many values: in_features must be a multiple

__all__ = ["BLOCK", "BY_NAME", "CSRC", "VARIANTS", "BuildError", "F32Product", "Int4Product", "Int8Product",
           "Kernels", "Variant", "build", "candidate_variants", "compiler", "cpu_features", "f32_available",
           "inductor_cache_dir", "int4_available", "int8_available", "kernels", "load", "machine", "prepare",
           "select", "supported_variants", "usable_variants", "variant_name"]


def _check_weights(weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None = None) -> None:
    """Raises ValueError unless weight (N, K), bias and scales (N,) are CPU tensors that fit together."""
    if any(t is not None and t.device.type != "cpu" for t in (weight, bias, scales)):
        raise ValueError("the row kernels take CPU tensors")
    if weight.dim() != 2:
        raise ValueError(f"row kernel shapes do not fit: weight {tuple(weight.shape)} is not (N, K)")
    for name, t in (("bias", bias), ("scales", scales)):
        if t is not None and tuple(t.shape) != (weight.shape[0],):
            raise ValueError(f"row kernel {name} has shape {tuple(t.shape)}, not ({weight.shape[0]},)")


def _multiply(name: str, x: torch.Tensor, N: int, K: int, dtype: torch.dtype, run) -> torch.Tensor:
    """Returns the (M, N) product in `dtype` that run(x, M, y) writes into y, after checking x (M, K) against the
    bound weight's (N, K): the C code trusts the sizes it is given. run returns the kernel's status (0: done)."""
    shape = x.shape
    if len(shape) != 2 or shape[1] != K or not x.is_cpu:
        raise ValueError(f"row kernel shapes do not fit: x {tuple(shape)} on {x.device}, weight ({N}, {K})")
    if not x.is_contiguous():
        x = x.contiguous()
    M = shape[0]
    y = torch.empty(M, N, dtype=dtype)
    if run(x, M, y) != 0:
        raise RuntimeError(f"{name} row kernel refused a ({M}, {K}) x ({N}, {K}) product")
    return y


class Kernels:
    """The products of one loaded variant library."""

    def __init__(self, variant: Variant, lib: ctypes.CDLL, built: bool = False):
        self.variant, self.lib, self.built = variant, lib, built
        self.name = variant.name
        lib.neoj_rowmatmul_i8.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                          ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int]
        lib.neoj_rowmatmul_i8.restype = ctypes.c_int
        lib.neoj_rowmatmul_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                           ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        lib.neoj_rowmatmul_f32.restype = ctypes.c_int
        self.int4_fn = getattr(lib, "neoj_rowmatmul_i4", None)  # x86 builds only
        if self.int4_fn is not None:
            self.int4_fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                                     ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int]
            self.int4_fn.restype = ctypes.c_int

    def __repr__(self) -> str:
        return f"Kernels({self.name})"

    def f32(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Returns x (M, K) @ weight (N, K)^T + bias as an (M, N) fp32 tensor, like F.linear.

        fp32 CPU tensors; K a multiple of 16. Each output row is summed in the same order for any M, so a
        row's values do not depend on the rows beside it.
        """
        return self.bind_f32(weight, bias)(x)

    def bind_f32(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "F32Product":
        """Returns the product by weight (+ bias), both checked now, once."""
        return F32Product(self.lib.neoj_rowmatmul_f32, weight, bias)

    def int8(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """Returns x (M, K) @ (qweight (N, K) int8 * scales (N,) fp32)^T + bias, an (M, N) tensor in x's dtype.

        x and bias are float32 or bfloat16 (the same one); products and sums are exact integers per
        block of BLOCK activations scaled to 15 bits, then fp32. CPU tensors; K a multiple of BLOCK.
        A row's values do not depend on the rows beside it.
        """
        if x.dtype not in (torch.float32, torch.bfloat16) or (bias is not None and bias.dtype != x.dtype):
            raise TypeError(f"int8_rowmatmul takes float32 or bfloat16 activations and bias, got {x.dtype}")
        return self.bind_int8(qweight, scales, bias)(x)

    def bind_int8(self, qweight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> "Int8Product":
        """Returns the product by qweight * scales (+ bias), its weights checked now, once."""
        return Int8Product(self.lib.neoj_rowmatmul_i8, qweight, scales, bias)


    def int4(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """Returns x (M, K) @ w^T + bias for int4 weights in neoj's portable form (qweight uint8 (N, K / 2), the
        even column in the high nibble; scales and mins fp32 (N, K / group), w = q * scale + min), an (M, N)
        tensor in x's dtype. The group size (32-256) divides BLOCK; K a multiple of BLOCK. A row's values do not
        depend on the rows beside it."""
        return self.bind_int4(qweight, scales, mins, bias)(x)

    def bind_int4(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  bias: torch.Tensor | None = None) -> "Int4Product":
        """Returns the product by an int4 weight (+ bias), its tensors checked now, once."""
        if self.int4_fn is None:
            raise RuntimeError(f"the {self.name} kernels have no int4 product")
        return Int4Product(self.int4_fn, qweight, scales, mins, bias)


_BF16_FLAG = {torch.float32: 0, torch.bfloat16: 1}  # the activation dtypes the int8 kernel takes: its bf16 flag


class Int8Product:
    """One int8 weight, its scales and bias, checked once and then multiplied by many activations.

    A decode step calls every layer once per token; checking the same weights on every call took longer
    than a small layer's whole product. The product keeps its tensors referenced (the C code is given
    their addresses); `holds` tells a caller whether it still describes a layer's current tensors.
    """

    def __init__(self, fn, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        if qweight.dtype != torch.int8 or scales.dtype != torch.float32:
            raise TypeError(f"int8_rowmatmul takes int8 weights and float32 scales, got {qweight.dtype} and "
                            f"{scales.dtype}")
        if bias is not None and bias.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"int8_rowmatmul takes a float32 or bfloat16 bias, got {bias.dtype}")
        _check_weights(qweight, bias, scales)
        self._fn = fn
        self._given = (qweight, scales)  # what `holds` compares with, even where contiguous copies are read
        self.qweight, self.scales, self.bias = qweight.contiguous(), scales.contiguous(), bias
        self._bias_key = self._key_of(bias)
        self._biases: dict[torch.dtype, torch.Tensor] = {}  # the bias in each activation dtype: copies

    @staticmethod
    def _key_of(bias: torch.Tensor | None) -> tuple | None:
        return None if bias is None else (bias.data_ptr(), bias._version)

    def holds(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True when this product is still the one of these tensors (the same tensors, the bias unchanged:
        the product multiplies by copies of it)."""
        return (qweight is self._given[0] and scales is self._given[1] and bias is self.bias
                and self._key_of(bias) == self._bias_key)

    def _bias_ptr(self, dtype: torch.dtype) -> int | None:
        if self.bias is None:
            return None
        b = self._biases.get(dtype)
        if b is None:
            b = self._biases[dtype] = self.bias.detach().to(dtype, copy=True).contiguous()
        return b.data_ptr()

    NAME = "int8"

    def _weight_shape(self) -> tuple[int, int]:
        return self.qweight.shape  # read on every call: the tensor's data may have been replaced

    def _run(self, x: torch.Tensor, M: int, K: int, N: int, y: torch.Tensor, bf16: int) -> int:
        return self._fn(x.data_ptr(), M, K, self.qweight.data_ptr(), N, self.scales.data_ptr(),
                        self._bias_ptr(y.dtype), y.data_ptr(), bf16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Returns x (M, K) @ the weight^T (+ bias), in x's dtype (float32 or bfloat16)."""
        dtype = x.dtype
        bf16 = _BF16_FLAG.get(dtype)
        if bf16 is None:
            raise TypeError(f"{self.NAME}_rowmatmul takes float32 or bfloat16 activations, got {dtype}")
        N, K = self._weight_shape()
        return _multiply(self.NAME, x, N, K, dtype, lambda xc, M, y: self._run(xc, M, K, N, y, bf16))


class F32Product:
    """One fp32 weight and its bias, checked once and then multiplied by many activations (see Int8Product: a
    decode step calls every layer once per token, and the checks cost as much as a small layer's product).

    It reads the weight and bias in place, so changes made to them in place are seen; `holds` tells a caller
    whether it is still the product of a layer's tensors. Non-contiguous ones are read from copies made here,
    and then `holds` is False (a copy would not see later changes): such a product serves one call.
    """

    def __init__(self, fn, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise TypeError(f"f32_rowmatmul takes float32 tensors, got {weight.dtype} and "
                            f"{None if bias is None else bias.dtype}")
        _check_weights(weight, bias)
        self._fn = fn
        self._given = (weight, bias)
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self._in_place = self.weight is weight and self.bias is bias

    def holds(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True when this product reads these very tensors."""
        return self._in_place and weight is self._given[0] and bias is self._given[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Returns x (M, K) @ the weight^T (+ bias), fp32."""
        if x.dtype != torch.float32:
            raise TypeError(f"f32_rowmatmul takes float32 tensors, got {x.dtype} activations")
        N, K = self.weight.shape
        bias_ptr = None if self.bias is None else self.bias.data_ptr()
        return _multiply("fp32", x, N, K, torch.float32,
                         lambda xc, M, y: self._fn(xc.data_ptr(), M, K, self.weight.data_ptr(), N, bias_ptr,
                                                   y.data_ptr()))


class Int4Product(Int8Product):
    """One int4 weight (neoj's portable form), its scales, mins and bias, checked once; see Kernels.int4."""

    def __init__(self, fn, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None = None):
        if qweight.dtype != torch.uint8 or scales.dtype != torch.float32 or mins.dtype != torch.float32:
            raise TypeError(f"int4_rowmatmul takes uint8 weights and float32 scales and mins, got {qweight.dtype}, "
                            f"{scales.dtype} and {mins.dtype}")
        if bias is not None and bias.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"int4_rowmatmul takes a float32 or bfloat16 bias, got {bias.dtype}")
        _check_weights(qweight, bias)
        N, half = qweight.shape
        if scales.dim() != 2 or tuple(mins.shape) != tuple(scales.shape) or scales.shape[0] != N or \
                (2 * half) % scales.shape[1]:
            raise ValueError(f"int4 row kernel scales {tuple(scales.shape)} and mins {tuple(mins.shape)} do not fit "
                             f"a weight of {N} rows x {2 * half} columns")
        self.group_size = 2 * half // scales.shape[1]
        if self.group_size < 32 or BLOCK % self.group_size:
            raise ValueError(f"int4 row kernel group size {self.group_size} does not divide {BLOCK}")
        self._fn = fn
        self._given = (qweight, scales, mins)
        self.qweight, self.scales, self.mins, self.bias = (qweight.contiguous(), scales.contiguous(),
                                                           mins.contiguous(), bias)
        self._bias_key = self._key_of(bias)
        self._biases = {}

    def holds(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              mins: torch.Tensor | None = None) -> bool:
        """True when this product is still the one of these tensors (see Int8Product.holds)."""
        return super().holds(qweight, scales, bias) and mins is self._given[2]

    NAME = "int4"

    def _weight_shape(self) -> tuple[int, int]:
        q = self.qweight
        return q.shape[0], 2 * q.shape[1]  # two weights per byte

    def _run(self, x: torch.Tensor, M: int, K: int, N: int, y: torch.Tensor, bf16: int) -> int:
        return self._fn(x.data_ptr(), M, K, self.qweight.data_ptr(), N, self.group_size, self.scales.data_ptr(),
                        self.mins.data_ptr(), self._bias_ptr(y.dtype), y.data_ptr(), bf16)


def load(name: str) -> Kernels:
    """Returns the variant called `name` built and loaded (tests, benchmarks), even above NEOJ_ISA.

    Raises BuildError where this CPU lacks its features or it cannot be built."""
    variant = BY_NAME[name]
    if variant not in supported_variants():
        raise BuildError(f"this CPU cannot run the {name} kernels")
    lib, built = build(variant)
    return Kernels(variant, lib, built)


_selected: list = []  # [Kernels | None] once chosen: one variant per process
_select_lock = threading.Lock()  # server threads loading models at once choose (and build) once


def select() -> Kernels | None:
    """Returns the best variant that builds and loads here (at most NEOJ_ISA), or None; tries once per process."""
    for variant in candidate_variants():
        try:
            lib, built = build(variant)
            return Kernels(variant, lib, built)
        except (OSError, BuildError, subprocess.SubprocessError) as exc:
            log.warning("%s decode kernels unavailable (%s); trying a lower ISA", variant.name, exc)
    return None


def kernels() -> Kernels | None:
    """Returns this process's kernels, choosing (and building) them on the first call."""
    if not _selected:
        with _select_lock:
            if not _selected:
                _selected.append(select())
    return _selected[0]


def prepare() -> Kernels | None:
    """Builds and loads the kernels now (at model load), so no request waits for the compiler."""
    return kernels()


def int8_available() -> bool:
    """True when the int8 kernel can be used in this process."""
    return kernels() is not None


def int4_available() -> bool:
    """True when this process's kernels have the int4 product (the x86 builds)."""
    k = kernels()
    return k is not None and k.int4_fn is not None


def f32_available() -> bool:
    """True when the fp32 kernel can be used in this process."""
    return kernels() is not None


def variant_name() -> str:
    """Returns the variant in use ("avx2", "avx512", ...), or "none"."""
    k = kernels()
    return k.name if k is not None else "none"

