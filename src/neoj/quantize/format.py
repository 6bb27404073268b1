"""neoj's quantized format: QuantSpec (which scheme), and weights to and from their portable integer parts.

Weight-only quantization stores every linear layer and the LM head as integers with floating-point
scales; activations, layer norms, attention and the token embedding keep the compute dtype. Rows are
quantized independently (per-row scales, per-row groups), so a weight can be quantized a block of
rows at a time with the same result.

The portable form (what `neoj quantize` writes and `neoj.load` reads): per quantized layer
`NAME.qweight` + `NAME.scales` (+ `NAME.mins` for int4) under transformers' module names, and
quantization.json naming the scheme. int8: qweight int8 (out, in), w = qweight * scales[:, None].
int4: qweight uint8 (out, in / 2) holding two 4-bit values q in 0..15 per byte, the even column in the
high nibble; scales and mins (out, in / group_size) with w = q * scale + min for each group.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, NeojError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
QUANTIZATION_FILE = "quantization.json"
# Rows quantized at a time: bounds the temporaries to a few MB whatever the matrix size.
CHUNK_ROWS = 1024
# The layers that are quantized: every linear layer of the blocks, and the LM head.
_LINEAR = re.compile(r"^(blocks\.\d+\.(attn\.(q|k|v|out)_proj|mlp\.fc_(in|out))|lm_head)\.weight$")


@dataclass(frozen=True)
class QuantSpec:
    """How a model's linear layers are quantized: "int8" (per output channel) or "int4" (per group)."""

    scheme: str
    group_size: int = 128

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise NeojError(f"unknown quantization {self.scheme!r}; use int8 or int4")
        if self.scheme == "int4" and self.group_size not in GROUP_SIZES:
            raise NeojError(f"int4 group size {self.group_size} is not supported; use one of {GROUP_SIZES}")

    @classmethod
    def parse(cls, quantize: "str | QuantSpec | None", group_size: int | None = None) -> "QuantSpec | None":
        """Returns the spec for a --quantize value (None, "none", "int8", "int4") and group size."""
        if quantize is None or isinstance(quantize, QuantSpec):
            return quantize
        if quantize in ("none", "", "off"):
            return None
        return cls(quantize, group_size or 128)

    def quantizes(self, name: str) -> bool:
        """Returns True if the neoj parameter `name` is a weight this spec quantizes."""
        return bool(_LINEAR.match(name))

    def bytes_per_weight(self) -> float:
        """Returns the stored bytes per weight of a quantized layer, scales included (fp32 portable form)."""
        return 1.0 if self.scheme == "int8" else 0.5 + 8.0 / self.group_size

    def to_dict(self) -> dict:
        """Returns the quantization.json content."""
        return {"quant_method": "neoj", "format_version": 1, **asdict(self)}

    @classmethod
    def read(cls, directory: Path) -> "QuantSpec | None":
        """Returns the spec of a quantized checkpoint directory, or None for a full-precision one."""
        path = Path(directory) / QUANTIZATION_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("quant_method") != "neoj":
                raise ValueError(f"quant_method {data.get('quant_method')!r} is not neoj's")
            return cls(data["scheme"], int(data.get("group_size", 128)))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a neoj quantization file ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# Quantizing and dequantizing tensors (portable form)


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Returns {"qweight": int8 (out, in), "scales": fp32 (out,)}: symmetric, one scale per output row."""
    out = w.shape[0]
    qweight = torch.empty(w.shape, dtype=torch.int8, device=w.device)  # on the weight's device: a GPU quantizes
    scales = torch.empty(out, dtype=torch.float32, device=w.device)   # a 6B model in seconds
    for start in range(0, out, CHUNK_ROWS):
        rows = w[start : start + CHUNK_ROWS].float()
        scale = rows.abs().amax(dim=1).clamp(min=1e-10) / 127.0
        qweight[start : start + CHUNK_ROWS] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        scales[start : start + CHUNK_ROWS] = scale
    return {"qweight": qweight, "scales": scales}


def dequantize_int8(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Returns the fp32 weight that int8 parts stand for."""
    return parts["qweight"].float() * parts["scales"].float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Returns {"qweight": uint8 (out, in/2), "scales", "mins": fp32 (out, in/group)}: asymmetric per group."""
    out, inn = w.shape
    if inn % group_size:
        raise NeojError(f"int4 needs the input size ({inn}) to be a multiple of the group size ({group_size}); "
                        f"pass a group size that divides it (one of {GROUP_SIZES})")
    groups = inn // group_size
    qweight = torch.empty(out, inn // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out, groups, dtype=torch.float32, device=w.device)
    mins = torch.empty(out, groups, dtype=torch.float32, device=w.device)
    for start in range(0, out, CHUNK_ROWS):
        rows = w[start : start + CHUNK_ROWS].float().view(-1, groups, group_size)
        lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-10)
        q = torch.round((rows - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(-1, inn)
        qweight[start : start + CHUNK_ROWS] = (q[:, 0::2] << 4) | q[:, 1::2]
        scales[start : start + CHUNK_ROWS] = scale
        mins[start : start + CHUNK_ROWS] = lo
    return {"qweight": qweight, "scales": scales, "mins": mins}


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Returns the 4-bit values (out, in) as int32 from the packed uint8 (out, in/2)."""
    q = torch.stack(((qweight >> 4) & 15, qweight & 15), dim=-1)
    return q.view(qweight.shape[0], -1).to(torch.int32)


def dequantize_int4(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Returns the fp32 weight that int4 parts stand for."""
    q = unpack_int4(parts["qweight"]).float()
    out, groups = parts["scales"].shape
    q = q.view(out, groups, -1) * parts["scales"].float()[..., None] + parts["mins"].float()[..., None]
    return q.view(out, -1)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Returns the portable parts of one weight matrix (out, in), on the CPU."""
    w = w.detach().cpu()
    return quantize_int8(w) if spec.scheme == "int8" else quantize_int4(w, spec.group_size)


def dequantize(parts: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Returns the fp32 weight that portable parts stand for."""
    return dequantize_int8(parts) if spec.scheme == "int8" else dequantize_int4(parts)


def check_parts(name: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], spec: QuantSpec) -> None:
    """Raises CheckpointError unless `parts` are a well-formed quantized (out, in) weight."""
    out, inn = shape
    if spec.scheme == "int8":
        want = {"qweight": ((out, inn), torch.int8), "scales": ((out,), None)}
    else:
        g = inn // spec.group_size
        want = {"qweight": ((out, inn // 2), torch.uint8), "scales": ((out, g), None), "mins": ((out, g), None)}
    for key, (wshape, wdtype) in want.items():
        t = parts.get(key)
        if t is None:
            raise CheckpointError(f"quantized checkpoint is missing {name}.{key}")
        if tuple(t.shape) != wshape or (wdtype is not None and t.dtype != wdtype) or (
                wdtype is None and not t.dtype.is_floating_point):
            raise CheckpointError(f"{name}.{key} has shape {list(t.shape)} and dtype {t.dtype}, but {spec.scheme} "
                                  f"for a {out}x{inn} weight needs {list(wshape)} {wdtype or 'floating point'}")
    extra = set(parts) - set(want)
    if extra:
        raise CheckpointError(f"quantized checkpoint has unexpected tensors for {name}: {sorted(extra)}")

