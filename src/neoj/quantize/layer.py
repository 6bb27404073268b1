"""QuantLinear, the int8/int4 linear layer, and putting it in place of a model's linear layers.

A QuantLinear keeps its weight in the fast layout of its device: int8 as is (with bf16 and fp32
scales), int4 in the portable form on CPUs where neoj's own int4 kernel is the faster path
(linear.int4_kernel_on_cpu: AVX2), else in tinygemm's packed form where this torch has the kernel
(otherwise in the portable form, dequantized on the fly: memory saved, speed of the compute dtype). Its
forward hands every call to neoj.linear, whose RULES table picks the kernel by measurement (see
BENCHMARKS.md for the figures): neoj's own integer kernels (rowmatmul) for a few int8 (and, on AVX2, int4)
rows on CPU, aten's int8/int4 pack kernels
otherwise, and dequantizing to bf16 for one matmul when many rows (prefill) make that faster.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import linear
from .format import CHUNK_ROWS, QuantSpec, dequantize_int4, quantize_weight, unpack_int4

log = logging.getLogger(__name__)


class QuantLinear(nn.Module):
    """A linear layer whose weight is int8 or int4, stored in the fast layout of its device."""

    # neoj.linear may send one-row int8 products of large weights (its "compiled_int8_matvec" rule) to a
    # TorchInductor kernel compiled on first use: a few seconds once per shape and process
    # (NEOJ_COMPILE=0 turns it off).
    allow_compile = True

    def __init__(self, parts: dict[str, torch.Tensor], spec: QuantSpec, bias: torch.Tensor | None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        self.spec = spec
        self.out_features = parts["qweight"].shape[0]
        self.in_features = parts["qweight"].shape[1] * (2 if spec.scheme == "int4" else 1)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.kernel = "dequantize"
        if spec.scheme == "int8":
            qweight = parts["qweight"].to(device)
            if qweight.data_ptr() % 64:  # a view into a mapped file: the kernel needs its own aligned copy
                qweight = qweight.clone()
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", parts["scales"].to(device, torch.bfloat16))
            self.scales_fp32 = parts["scales"].to(device, torch.float32)  # for the C and compiled kernels
            self.kernel = "int8pack"
        else:
            self._init_int4(parts, device)

    def _init_int4(self, parts: dict[str, torch.Tensor], device: torch.device) -> None:
        # tinygemm's form: w = (q - 8) * scale + zero, so zero = min + 8 * scale; (groups, out, 2) in bf16.
        # Its kernels want the row count a multiple of 16: pad with zero rows (GPT-Neo's head has 50257)
        # and slice them off the output.
        qweight, scales, mins = parts["qweight"], parts["scales"].float(), parts["mins"].float()
        if device.type == "cpu" and linear.int4_kernel_on_cpu():  # neoj's kernel reads the portable form
            for key, t in (("qweight", qweight), ("scales", scales), ("mins", mins)):
                self.register_buffer(key, t.to(device).contiguous())
            return
        pad = -self.out_features % 16
        if pad:
            qweight = F.pad(qweight, (0, 0, 0, pad))
            scales, mins = F.pad(scales, (0, 0, 0, pad)), F.pad(mins, (0, 0, 0, pad))
        sz = torch.stack((scales, mins + 8 * scales), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        try:
            if device.type == "cpu":
                # Row blocks: unpacking to int32 is 8x the packed size (825 MB for GPT-J's head at once).
                packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(rows), 1)
                                    for rows in qweight.split(CHUNK_ROWS)])
                self.kernel = "int4pack_cpu"
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack(qweight.to(device), 8)
                self.kernel = "int4pack_cuda"
            self.register_buffer("qweight", packed.to(device))
            self.register_buffer("scales_zeros", sz.to(device))
        except (RuntimeError, AttributeError) as exc:  # a torch build or shape the kernel does not take
            log.warning("int4 kernel unavailable for a %dx%d weight (%s); dequantizing on the fly",
                        self.out_features, self.in_features, exc)
            for key in ("qweight", "scales", "mins"):
                self.register_buffer(key, parts[key].to(device))

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """Returns the fp32 weight (those output rows) of a layer kept in the portable int4 form (kernel
        "dequantize")."""
        return dequantize_int4({"qweight": self.qweight[rows], "scales": self.scales[rows], "mins": self.mins[rows]})

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.scheme}"
                f"{f' group {self.spec.group_size}' if self.spec.scheme == 'int4' else ''}, kernel={self.kernel}")

    def _apply(self, fn, *args, **kwargs):
        linear.forget(self)  # .to(), .cuda(), ...: the remembered product would keep the old tensors alive
        # The portable int4 form's scales and mins stay fp32 when the model is cast (.to(bfloat16)): neoj's
        # kernel reads fp32, and rounding them would move every weight.
        fp32 = {k: self._buffers[k] for k in ("scales", "mins") if self.kernel == "dequantize" and k in self._buffers}
        out = super()._apply(fn, *args, **kwargs)
        for key, before in fp32.items():
            if self._buffers[key].dtype != torch.float32:
                self._buffers[key] = before.to(self._buffers[key].device, torch.float32)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # neoj.linear picks the kernel for this call (its RULES table) and adds the bias.
        return linear.run(self, x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replaces the model's linear layers (and LM head) with QuantLinear, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and spec.quantizes(name + ".weight"):
            replace_linear(model, name, QuantLinear(quantize_weight(module.weight, spec), spec, module.bias,
                                                    module.weight.device))
    return model


def replace_linear(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Puts `layer` in place of the submodule called `name`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, layer)


def decode_read_bytes(model: nn.Module) -> int:
    """Returns the bytes of weights one decode step reads: everything but the embedding tables' unread rows."""
    seen: set[int] = set()
    total = 0
    skip = {id(model.wte.weight)} | ({id(model.wpe.weight)} if model.wpe is not None else set())
    head = model.lm_head
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen or (id(t) in skip and not (isinstance(head, nn.Linear) and t is head.weight)):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total - (model.rope.numel() * model.rope.element_size() if model.rope is not None else 0)

