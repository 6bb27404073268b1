"""Faster single-row linear layers for CPU decoding, swapped in for nn.Linear without touching the model.

Decoding one token multiplies each weight matrix by one vector. MKL's fp32 GEMV reaches about
9-14 GB/s on this class of CPU (2-core AMD EPYC, AVX2), well under the ~26 GB/s the memory can
stream; a matrix-vector product written as a reduction and compiled by TorchInductor streams the
weights at 20-30 GB/s (bench/ has the measurements); in bf16, where PyTorch's stock path reaches
5-9 GB/s, the same kernel (fp32 accumulation) is 2-3x faster too. Batches and prefill keep F.linear.
Set NEOJ_COMPILE=0 to turn this off; any compiler failure falls back to F.linear.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_state = {"enabled": os.environ.get("NEOJ_COMPILE", "1") != "0", "fns": None}


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

        # dynamic=False: each weight shape gets its own kernel (a model has four or five shapes).
        _state["fns"] = (torch.compile(matvec, dynamic=False), torch.compile(matvec_bias, dynamic=False))
    return _state["fns"]


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DecodeLinear(nn.Linear):
    """nn.Linear whose one-row, no-grad CPU calls use the compiled matrix-vector kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (_state["enabled"] and x.numel() == self.in_features and w.dtype in _KERNEL_DTYPES
                and w.device.type == "cpu" and not (torch.is_grad_enabled() and w.requires_grad)):
            try:
                matvec, matvec_bias = _compiled()
                flat = x.reshape(1, -1)
                y = matvec(flat, w) if self.bias is None else matvec_bias(flat, w, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
            except Exception as exc:  # no C++ compiler, unsupported platform, ...
                log.warning("compiled decode kernel unavailable (%s); using F.linear", exc)
                _state["enabled"] = False
        return F.linear(x, w, self.bias)


def use_decode_kernels(model: nn.Module) -> nn.Module:
    """Replaces every plain nn.Linear in `model` with a DecodeLinear sharing its parameters; returns model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                fast = DecodeLinear.__new__(DecodeLinear)
                nn.Module.__init__(fast)
                fast.in_features, fast.out_features = child.in_features, child.out_features
                fast.weight, fast.bias = child.weight, child.bias
                setattr(parent, name, fast)
    return model
