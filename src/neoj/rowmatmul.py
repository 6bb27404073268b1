"""Few-row matrix products for CPU decoding, from csrc/rowmatmul.c: int8 weights with AVX512-VNNI, and
fp32 weights (a server's decode batch, or one row of a wide layer) with AVX-512.

The C file is compiled on first use with the system C compiler (`CC`, else cc/gcc) for the CPU it runs
on (-march=native) and cached under ~/.cache/neoj/kernels, keyed by the source, the compiler flags and
the CPU's feature flags, so a cache shared between machines never hands one a library it cannot run.
No compiler, no AVX-512, a failed build or NEOJ_COMPILE=0: `available()` (int8, which also needs VNNI) and
`f32_available()` are False and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "rowmatmul.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
BLOCK = 256  # activations are scaled per block of this many values: in_features must be a multiple
_lib: dict = {}


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neoj" / "kernels"


def _build() -> ctypes.CDLL | None:
    flags = _cpu_flags()
    if os.environ.get("NEOJ_COMPILE", "1") == "0" or "avx512f" not in flags:
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode() + flags.encode()).hexdigest()[:16]
    target = _cache_dir() / f"rowmatmul-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed: a process killed mid-build never leaves a broken library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.neoj_rowmatmul_i8_vnni.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                           ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_int]
    lib.neoj_rowmatmul_i8_vnni.restype = ctypes.c_int
    lib.neoj_rowmatmul_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                                       ctypes.c_void_p, ctypes.c_void_p]
    lib.neoj_rowmatmul_f32.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """Returns the compiled library, building it on first call; None where it cannot be used."""
    if "lib" not in _lib:
        try:
            lib = _build()
        except (OSError, subprocess.SubprocessError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            log.warning("decode kernels not built (%s %s); using PyTorch's kernels",
                        exc, err.decode(errors="replace")[-500:])
            lib = None
        # Asked once here, not on every layer call of a decode step.
        _lib["int8"] = lib is not None and bool(lib.neoj_rowmatmul_has_vnni())
        _lib["f32"] = lib is not None and bool(lib.neoj_rowmatmul_has_f32())
        _lib["lib"] = lib
    return _lib["lib"]


def available() -> bool:
    """True when the int8 kernel can be used in this process."""
    library()
    return _lib["int8"]


def f32_available() -> bool:
    """True when the fp32 kernel can be used in this process."""
    library()
    return _lib["f32"]


def f32_rowmatmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Returns x (M, K) @ weight (N, K)^T + bias as an (M, N) fp32 tensor, like F.linear.

    fp32 CPU tensors; K a multiple of 16; the caller checks `f32_available()` first. Each output row is
    summed in the same order for any M, so a row's values do not depend on the rows beside it.
    """
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        raise TypeError(f"f32_rowmatmul takes float32 tensors, got {x.dtype} and {weight.dtype}")
    x, weight = x.contiguous(), weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    bias_ptr = None if bias is None else bias.contiguous().data_ptr()
    if library().neoj_rowmatmul_f32(x.data_ptr(), M, K, weight.data_ptr(), N, bias_ptr, y.data_ptr()) != 0:
        raise RuntimeError(f"fp32 row kernel refused a ({M}, {K}) x ({N}, {K}) product")
    return y


def int8_rowmatmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Returns x (M, K) @ (qweight (N, K) int8 * scales (N,) fp32)^T + bias, an (M, N) tensor in x's dtype.

    x and bias are float32 or bfloat16 (the same one); products and sums are fp32 either way. CPU
    tensors; K a multiple of BLOCK; the caller checks `available()` first.
    """
    if x.dtype not in (torch.float32, torch.bfloat16) or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"int8_rowmatmul takes float32 or bfloat16 activations and bias, got {x.dtype}")
    x = x.contiguous()
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    bias_ptr = None if bias is None else bias.contiguous().data_ptr()
    if library().neoj_rowmatmul_i8_vnni(x.data_ptr(), M, K, qweight.data_ptr(), N, scales.data_ptr(), bias_ptr,
                                        y.data_ptr(), int(x.dtype == torch.bfloat16)) != 0:
        raise RuntimeError(f"int8 row kernel refused a ({M}, {K}) x ({N}, {K}) product")
    return y
