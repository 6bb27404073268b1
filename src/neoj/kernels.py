"""Faster single-row linear layers for CPU decoding, swapped in for nn.Linear without touching the model.

Decoding one token multiplies each weight matrix by one vector. MKL's fp32 GEMV reaches about
9-14 GB/s on this class of CPU (2-core AMD EPYC, AVX2), well under the ~26 GB/s the memory can
stream; a matrix-vector product written as a reduction and compiled by TorchInductor streams the
weights at 20-30 GB/s (bench/ has the measurements). Batches and prefill keep F.linear, which is
faster there. Set NEOJ_COMPILE=0 to turn this off; any compiler failure falls back to F.linear.
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
        def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (w * x).sum(-1)  # x (1, in), w (out, in) -> (out,)

        def matvec_bias(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (w * x).sum(-1) + b

        # dynamic=False: each weight shape gets its own kernel (a model has four or five shapes).
        _state["fns"] = (torch.compile(matvec, dynamic=False), torch.compile(matvec_bias, dynamic=False))
    return _state["fns"]


class DecodeLinear(nn.Linear):
    """nn.Linear whose one-row, no-grad, fp32 CPU calls use the compiled matrix-vector kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (_state["enabled"] and x.numel() == self.in_features and w.dtype == torch.float32
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
