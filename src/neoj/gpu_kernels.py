"""neoj's own GPU kernels: the int8 weight-only product for decoding, written in Triton.

Decoding multiplies each weight matrix by 1-16 rows, so it is bound by reading the weights. PyTorch
has no fast CUDA path for int8 weights with bf16 activations at that size: dequantizing first writes
and re-reads the weights in bf16 (5 bytes moved per weight instead of 1), and _weight_int8pack_mm's
CUDA kernel reads the weights uncoalesced (BENCHMARKS.md, GPU decode). These kernels read each int8
weight once and convert it in registers:

  * one row: each program reduces BLOCK_N weight rows against the activation, fp32 sums;
  * 2-16 rows: each program multiplies a (16, BLOCK_K) activation tile by a (BLOCK_K, BLOCK_N) weight
    tile on the tensor cores (rows past the real ones masked), so a weight tile serves every row.

Block sizes are autotuned per weight shape on first use (a few seconds, once per process; Triton keeps
the compiled kernels on disk). Triton comes with PyTorch's CUDA builds and is imported only when a
CUDA int8 layer first runs. With TRITON_INTERPRET=1 the kernels run on CPU tensors, untuned (how
tests/test_gpu_kernels.py checks them without a GPU). K, the input width, is a compile-time constant:
one kernel per layer width.
"""

from __future__ import annotations

import functools
import os

import torch

MAX_ROWS = 16  # past this (prefill) a dequantized matmul on tensor cores is faster
TILE_ROWS = 16  # the tensor-core tile's row count: the 2-16-row kernel pads to it


def _configs(triton, pairs: list[tuple[int, int, int, int]]):
    """Returns autotune configs from (BLOCK_N, BLOCK_K, warps, stages); just the first in the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pairs = pairs[:1]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in pairs]


@functools.cache
def _kernels():
    """Returns (one-row kernel, few-row kernel), defined on first use (importing triton takes a second)."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=_configs(triton, [(8, 512, 4, 3), (16, 512, 8, 3), (4, 1024, 4, 3),
                                                (32, 256, 8, 4), (16, 1024, 8, 2)]), key=["N", "K"])
    @triton.jit
    def int8_matvec(x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr, N, K: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(q_ptr + cols[:, None] * K + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        y = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)

    @triton.autotune(configs=_configs(triton, [(32, 256, 4, 4), (64, 128, 4, 4), (16, 512, 4, 3),
                                                (32, 512, 8, 3), (64, 256, 8, 3)]), key=["N", "K"])
    @triton.jit
    def int8_matmul_few(x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K: tl.constexpr,
                        HAS_BIAS: tl.constexpr, FP32: tl.constexpr, TILE_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.arange(0, TILE_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((TILE_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(q_ptr + cols[None, :] * K + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0)
            if FP32:  # fp32 activations: exact fp32 products, not TF32
                acc += tl.dot(x, w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        y = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    return int8_matvec, int8_matmul_few


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Returns (x @ qweight.T) * scales + bias in x's dtype, for x (rows <= 16, in) bf16/fp16/fp32,
    qweight int8 (out, in) and fp32 scales (out,): products and sums in fp32."""
    rows, K = x.shape
    N = qweight.shape[0]
    if qweight.shape[1] != K or qweight.dtype != torch.int8 or not qweight.is_contiguous():
        raise ValueError(f"int8_matmul needs a contiguous int8 (out, {K}) weight, got {tuple(qweight.shape)} "
                         f"{qweight.dtype}")
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"int8_matmul takes 1-{MAX_ROWS} rows, got {rows}")
    x = x.contiguous()
    y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else scales  # any pointer: not read without HAS_BIAS
    matvec, few = _kernels()
    if rows == 1:
        matvec[lambda meta: (triton_cdiv(N, meta["BLOCK_N"]),)](x, qweight, scales, b, y, N, K,
                                                                 HAS_BIAS=bias is not None)
    else:
        few[lambda meta: (triton_cdiv(N, meta["BLOCK_N"]),)](x, qweight, scales, b, y, rows, N, K,
                                                              HAS_BIAS=bias is not None,
                                                              FP32=x.dtype == torch.float32, TILE_M=TILE_ROWS)
    return y


def triton_cdiv(a: int, b: int) -> int:
    """Returns ceil(a / b) for grid sizes."""
    return -(-a // b)
