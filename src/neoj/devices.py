"""Where and in what dtype a model runs: the device ("auto": CUDA when present), its free memory, the dtype.

neoj.api re-exports these (resolve_device, available_memory, cpu_has_fast_bf16, resolve_dtype, DTYPES).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import ModelConfig
from .errors import NeojError

if TYPE_CHECKING:  # for the annotation only: quantization is a layer above this module
    from .quantize import QuantSpec

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Returns the torch device for "auto" (CUDA when present), a name, or a device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise NeojError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeojError(f"device {device!r} asked for, but this PyTorch has no CUDA device; use --device cpu")
    return dev


def available_memory(device: torch.device) -> int:
    """Returns the bytes free for weights on `device` (RAM for cpu)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def cpu_has_fast_bf16() -> bool:
    """Returns True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX) and PyTorch may use those
    instructions: with PyTorch held below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as on an AVX2-only CPU) its bf16
    kernels are emulated, so neoj chooses as it would on such a CPU."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except Exception:  # a private probe missing from this torch build: assume no
            pass
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelConfig,
                  quantization: QuantSpec | None = None) -> torch.dtype:
    """Returns the dtype to run in; "auto" picks the fastest safe one for the device.

    CPU: bfloat16 where the CPU has bf16 instructions (AVX512-BF16, AMX): measured on such a 2-core
    EPYC, 2.2x faster prefill and 1.7x faster decode than fp32. Without them, bf16 matrix-matrix products
    run 10-100x slower than fp32, so float32 -- unless the fp32 weights would not fit in RAM.
    CUDA: bfloat16 where supported. float16 is never picked silently for GPT-Neo: its attention
    overflows fp16 on long inputs (transformers #11076). bf16 has fp32's range, and attention scores
    and softmax always run in fp32.
    Quantized: bfloat16 (the activation dtype PyTorch's int8/int4 kernels are fast with) on CUDA and on CPUs
    with bf16 instructions; on other CPUs float32: there bf16 attention and elementwise ops run 3-5x slower
    than fp32 (each value converted), neoj's int8 kernel takes fp32 activations as they are, and prefill
    multiplies dequantized weights in fp32 instead of emulated bf16 (BENCHMARKS.md, portable decode).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise NeojError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return DTYPES[dtype]
    if quantization is not None:
        return torch.float32 if device.type == "cpu" and not cpu_has_fast_bf16() else torch.bfloat16
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if cfg.rotary_dim else torch.float32
    if cpu_has_fast_bf16():
        return torch.bfloat16
    fp32_bytes = cfg.num_parameters() * 4
    return torch.float32 if fp32_bytes < 0.8 * available_memory(device) else torch.bfloat16
