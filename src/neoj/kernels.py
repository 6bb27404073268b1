"""Faster few-row linear layers for CPU decoding, swapped in for nn.Linear without touching the model.

Decoding multiplies each weight matrix by one row per sequence, and PyTorch's default CPU paths for
that are far from the memory bandwidth (measured on a 2-core AMD EPYC, torch 2.13, see BENCHMARKS.md):
- fp32, 2-16 rows (a server's decode batch), and one row of a layer at least 3072 wide: neoj's own
  AVX-512 kernel (rowmatmul.py) keeps the FMA units busy and prefetches the weights into L2: 18-27 GB/s
  at 8 rows where oneDNN's linear reads 9-18, and 26-29 GB/s at one row of a wide layer where the
  blocked product below reads 19-23 (bench/bench_f32_kernel.py).
- fp32, one row of a narrower layer (or no kernel): MKL's GEMV streams weights at 9-13 GB/s on one
  core. The same product as a batched matmul over 4 row blocks runs the blocks on all cores: 25-31 GB/s.
- fp32, 17-64 rows, or no kernel: MKL packs the weight matrix on every call (4-8 GB/s at 2-16 rows);
  oneDNN's linear reads it as it is: 10-16 GB/s, and still 1.3-2x MKL at 32-64 rows (a 32-sequence
  decode step of GPT-Neo-125M: 157 -> 105 ms).
- bf16/fp16, one row: oneDNN reaches about 10 GB/s; a reduction compiled by TorchInductor with fp32
  accumulation reaches 20+ GB/s, at the price of a few seconds of compiling in each new process, so
  it is used only for large models. Set NEOJ_COMPILE=0 to skip it.
Everything else (prefill, training, other devices) keeps F.linear. Any failure of a fast path falls
back to F.linear for good, with a warning.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import rowmatmul

log = logging.getLogger(__name__)

_state = {"compile": os.environ.get("NEOJ_COMPILE", "1") != "0", "onednn": True, "rowmatmul": True, "fns": None}
_BLOCKS = 4  # row blocks for the fp32 matrix-vector product: enough for up to 4 cores to share
_ONEDNN_MAX_ROWS = 64  # decode batches up to the server's default max_batch (32) and beyond
_ROWMATMUL_MAX_ROWS = 16  # past 16 rows the fp32 kernel is at parity with oneDNN (bench/bench_f32_kernel.py)
_ROWMATMUL_MIN_WIDTH_ONE_ROW = 3072  # narrower single rows: the blocked matvec is as fast or faster (same bench)


def _compiled():
    if _state["fns"] is None:
        import torch._dynamo

        # One kernel per (weight shape, dtype): a few per model, more with several models in one process.
        # Past the limit dynamo would silently run the uncompiled reduction, which is far slower.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)

        # x (1, in), w (out, in) -> (out,); products and sums in fp32 whatever the storage dtype.
        def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (w.float() * x.float()).sum(-1).to(w.dtype)

        def matvec_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return ((w.float() * x.float()).sum(-1) + b.float()).to(w.dtype)

        _state["fns"] = (torch.compile(matvec, dynamic=False), torch.compile(matvec_bias, dynamic=False))
    return _state["fns"]


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


class DecodeLinear(nn.Linear):
    """nn.Linear whose few-row, no-grad CPU calls take the fastest measured path for their dtype."""

    allow_compile = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.device.type != "cpu" or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return F.linear(x, w, b)
        rows = x.numel() // self.in_features
        try:
            if w.dtype == torch.float32:
                kernel_rows = rows > 1 or self.in_features >= _ROWMATMUL_MIN_WIDTH_ONE_ROW
                if kernel_rows and rows <= _ROWMATMUL_MAX_ROWS and self.in_features % 16 == 0 \
                        and _state["rowmatmul"] and rowmatmul.f32_available():
                    y = rowmatmul.f32_rowmatmul(x.reshape(rows, -1), w, b)
                    return y.view(*x.shape[:-1], self.out_features)
                if rows == 1:
                    return blocked_matvec(x, w, b).view(*x.shape[:-1], self.out_features)
                if rows <= _ONEDNN_MAX_ROWS and _state["onednn"]:
                    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), w, b, "none", [], "")
                    return y.view(*x.shape[:-1], self.out_features)
            elif rows == 1 and self.allow_compile and _state["compile"]:
                matvec, matvec_bias = _compiled()
                flat = x.reshape(1, -1)
                y = matvec(flat, w) if b is None else matvec_bias(flat, w, b)
                return y.view(*x.shape[:-1], self.out_features)
        except Exception as exc:  # no C++ compiler, a torch build without oneDNN, ...
            log.warning("fast decode path unavailable (%s); using F.linear", exc)
            _state["compile"] = _state["onednn"] = _state["rowmatmul"] = False
        return F.linear(x, w, b)


def use_decode_kernels(model: nn.Module, allow_compile: bool = False) -> nn.Module:
    """Replaces every plain nn.Linear in `model` with a DecodeLinear sharing its parameters; returns model.

    allow_compile lets half-precision single rows use the compiled kernel: worth its few seconds of
    start-up only when the weights are large (about 50 tokens repay it on GPT-Neo-1.3B; 700 on 125M).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fast = DecodeLinear.__new__(DecodeLinear)
                nn.Module.__init__(fast)
                fast.in_features, fast.out_features = child.in_features, child.out_features
                fast.weight, fast.bias = child.weight, child.bias
                fast.allow_compile = allow_compile
                setattr(parent, name, fast)
    return model
