"""Faster few-row linear layers for CPU decoding, swapped in for nn.Linear without touching the model.

Decoding multiplies each weight matrix by one row per sequence, and PyTorch's default CPU paths for
that are far from the memory bandwidth. DecodeLinear hands its calls to neoj.linear, which picks the
kernel by measurement (its RULES table: neoj's own C kernels for fp32 at a few rows, a blocked
matrix-vector product, oneDNN's linear, a TorchInductor reduction for half-precision single rows) and
turns off only a path that fails. Everything else (prefill, training, other devices) keeps F.linear.
Set NEOJ_COMPILE=0 to use no compiled kernel at all, NEOJ_ISA to cap the C kernels' instruction set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import linear


class DecodeLinear(nn.Linear):
    """nn.Linear whose few-row, no-grad CPU calls take the fastest measured path for their dtype."""

    allow_compile = False

    def _apply(self, fn, *args, **kwargs):
        linear.forget(self)  # .to(), .half(), ...: the remembered plans would keep the old weight alive
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not linear.weight_of(self).is_cpu or x.shape[-1] != self.in_features:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        return linear.run(self, flat).view(*x.shape[:-1], self.out_features)


def use_decode_kernels(model: nn.Module, allow_compile: bool = False) -> nn.Module:
    """Replaces every plain nn.Linear in `model` with a DecodeLinear sharing its parameters; returns model.

    allow_compile lets half-precision single rows use the compiled kernel: compiling costs start-up time
    that the faster decode repays only when the weights are large (measured in BENCHMARKS.md).
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
    linear.prepare(model)  # build the C kernels now, not inside the first request
    return model
