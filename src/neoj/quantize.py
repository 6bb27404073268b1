"""Weight-only quantization: per-channel int8 and group-wise int4 linear layers, on CPU and CUDA.

Every linear layer and the LM head can be stored as integers with floating-point scales; activations,
layer norms, attention and the token embedding keep the compute dtype. QuantLinear.forward hands each
call to neoj.linear, whose RULES table picks the kernel by measurement (see BENCHMARKS.md):
- int8, a few rows on CPU: neoj's own kernels (rowmatmul.py, csrc/rowmatmul_*.c, built per ISA: AVX2,
  AVX-512, AVX512-VNNI, NEON, NEON dot product), which multiply the weight bytes as integers instead of
  converting each to float, with activations kept to 15 bits instead of bf16's 8: with VNNI 1.3-2.5x the
  speed of aten._weight_int8pack_mm out of cache for inputs up to 4096 wide.
- int8 otherwise: aten._weight_int8pack_mm with bf16 activations (9-23 GB/s); the same op with fp32
  activations manages 1-2 GB/s, so activations are cast to bf16 for it. From 64 rows up (prefill)
  dequantizing to bf16 and one matmul is faster.
- int4: aten._weight_int4pack_mm_for_cpu (tinygemm's CPU port), 15 GB/s of packed weights at batch 1.
- CUDA: _weight_int4pack_mm for int4 and _weight_int8pack_mm for int8 where this torch has them;
  otherwise the layer dequantizes on the fly (memory saved, speed of the compute dtype).

Checkpoint format (what `neoj quantize` writes and `neoj.load` reads): per quantized layer
`NAME.qweight` + `NAME.scales` (+ `NAME.mins` for int4) under transformers' module names, and
quantization.json naming the scheme. int8: qweight int8 (out, in), w = qweight * scales[:, None].
int4: qweight uint8 (out, in / 2) holding two 4-bit values q in 0..15 per byte, the even column in the
high nibble; scales and mins (out, in / group_size) with w = q * scale + min for each group.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, NeojError
from . import linear
from .weights import RowSink, write_safetensors

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
QUANTIZATION_FILE = "quantization.json"
# Rows quantized at a time: bounds the temporaries to a few MB whatever the matrix size.
_CHUNK_ROWS = 1024
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
    for start in range(0, out, _CHUNK_ROWS):
        rows = w[start : start + _CHUNK_ROWS].float()
        scale = rows.abs().amax(dim=1).clamp(min=1e-10) / 127.0
        qweight[start : start + _CHUNK_ROWS] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
        scales[start : start + _CHUNK_ROWS] = scale
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
    for start in range(0, out, _CHUNK_ROWS):
        rows = w[start : start + _CHUNK_ROWS].float().view(-1, groups, group_size)
        lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-10)
        q = torch.round((rows - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(-1, inn)
        qweight[start : start + _CHUNK_ROWS] = (q[:, 0::2] << 4) | q[:, 1::2]
        scales[start : start + _CHUNK_ROWS] = scale
        mins[start : start + _CHUNK_ROWS] = lo
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


# ---------------------------------------------------------------------------------------------
# The layer


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
        pad = -self.out_features % 16
        if pad:
            qweight = F.pad(qweight, (0, 0, 0, pad))
            scales, mins = F.pad(scales, (0, 0, 0, pad)), F.pad(mins, (0, 0, 0, pad))
        sz = torch.stack((scales, mins + 8 * scales), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        try:
            if device.type == "cpu":
                # Row blocks: unpacking to int32 is 8x the packed size (825 MB for GPT-J's head at once).
                packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(rows), 1)
                                    for rows in qweight.split(_CHUNK_ROWS)])
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

    def dequantized_weight(self) -> torch.Tensor:
        """Returns the fp32 weight of a layer kept in the portable int4 form (kernel "dequantize")."""
        return dequantize_int4({"qweight": self.qweight, "scales": self.scales, "mins": self.mins})

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.scheme}"
                f"{f' group {self.spec.group_size}' if self.spec.scheme == 'int4' else ''}, kernel={self.kernel}")

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


# ---------------------------------------------------------------------------------------------
# Loading: quantize while the checkpoint streams in, or read a quantized checkpoint


def return_freed_memory_promptly() -> None:
    """Makes glibc serve allocations of 1 MiB and more with mmap, so each freed tensor returns to the OS.

    Quantizing while loading frees a full-precision tensor for every weight it keeps. By default glibc
    raises its mmap threshold as large blocks are freed and then carves later tensors out of its heaps,
    where freed space interleaved with kept scales cannot be returned: measured on GPT-J-6B, the peak
    RSS of the same int8 load varied between 6.6 and 12 GB from run to run. A fixed threshold keeps it
    at the model's size. No effect (and no harm) off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it disables the adjustment)
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Gives memory glibc holds free back to the OS (after loading)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StreamingQuantizer:
    """A load_state_into transform that quantizes each linear weight as it arrives.

    Only one full-precision tensor exists at a time: the model is never whole in full precision.
    Call finish(model) after loading to quantize a head tied to the embedding.
    """

    def __init__(self, model: nn.Module, spec: QuantSpec, dtype: torch.dtype, device: torch.device):
        self.model, self.spec, self.dtype, self.device = model, spec, dtype, torch.device(device)
        self.tied_head: QuantLinear | None = None
        return_freed_memory_promptly()

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if name == "wte.weight" and self.model.config.tie_word_embeddings:
            # The head tied to the embedding is quantized from the checkpoint's values, as `neoj quantize` does.
            self.tied_head = QuantLinear(quantize_weight(tensor, self.spec), self.spec, None, self.device)
        if not self.spec.quantizes(name):
            return tensor.to(device=self.device, dtype=self.dtype)
        module_name = name[: -len(".weight")]
        old = self.model.get_submodule(module_name)
        replace_linear(self.model, module_name, QuantLinear(quantize_weight(tensor, self.spec), self.spec,
                                                            old.bias, self.device))
        return None

    def row_sink(self, name: str, shape: tuple) -> RowSink | None:
        """Quantizes a linear weight block by block as it is read (load_state_into's RowSink hook).

        Rows are quantized independently (per-row scales, per-row groups), so this gives exactly what
        quantizing the whole tensor would, without holding it in full precision.
        """
        if not self.spec.quantizes(name) or len(shape) != 2:
            return None
        parts: dict[str, torch.Tensor] = {}

        def take(start: int, rows: torch.Tensor) -> None:
            for key, part in quantize_weight(rows, self.spec).items():
                if key not in parts:
                    parts[key] = torch.empty((shape[0], *part.shape[1:]), dtype=part.dtype)
                parts[key][start : start + part.shape[0]] = part

        def finish() -> None:
            module_name = name[: -len(".weight")]
            old = self.model.get_submodule(module_name)
            replace_linear(self.model, module_name, QuantLinear(parts, self.spec, old.bias, self.device))

        return RowSink(take, finish)

    def finish(self, model: nn.Module) -> nn.Module:
        """Puts the quantized copy of a head tied to the embedding in place; returns the model."""
        if isinstance(model.lm_head, nn.Linear):
            if self.tied_head is None:
                raise NeojError("internal: the tied LM head was never quantized")
            model.lm_head = self.tied_head
        trim_heap()
        return model


_PART = re.compile(r"^(.*)\.(qweight|scales|mins)$")


def load_quantized(directory: Path, spec: QuantSpec, dtype: torch.dtype, device: torch.device, cfg) -> nn.Module:
    """Returns the model of a quantized checkpoint (as `neoj quantize` writes it), ready to run."""
    from safetensors import safe_open

    from .weights import (_IGNORED, _assign, build_meta, hf_to_neoj_name, neoj_to_hf_name, read_safetensors_header,
                          weight_files)

    device = torch.device(device)
    files = weight_files(directory)
    if any(f.suffix != ".safetensors" for f in files):
        raise CheckpointError(f"{directory}: a quantized checkpoint must be safetensors")
    model = build_meta(cfg)
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    modules = dict(model.named_modules())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in files:
        read_safetensors_header(file)  # clear errors for truncated or corrupt files
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _PART.match(key)
                if m:
                    name = hf_to_neoj_name(m.group(1) + ".weight")
                    if not spec.quantizes(name) or name.rsplit(".", 1)[0] not in modules:
                        unexpected.append(key)
                        continue
                    parts.setdefault(name, {})[m.group(2)] = f.get_tensor(key)
                    continue
                name = hf_to_neoj_name(key)
                if _IGNORED.match(name):
                    continue
                if name not in expected or spec.quantizes(name):
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {list(tensor.shape)} but the config "
                                          f"needs {list(expected[name].shape)}")
                plain[name] = tensor.to(device=device, dtype=dtype)
    if unexpected:
        raise CheckpointError(f"{directory}: tensors this {spec.scheme} {cfg.model_type} checkpoint should not have: "
                              + ", ".join(unexpected[:10]))
    wanted = [n for n in expected if spec.quantizes(n)] + (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    missing = [n for n in wanted if n not in parts] + [n for n in expected if not spec.quantizes(n) and n not in plain]
    if missing:
        raise CheckpointError(f"{directory}: quantized checkpoint is missing {len(missing)} tensors, e.g. "
                              + ", ".join(missing[:10]))
    for name, tensor in plain.items():
        _assign(model, name, tensor)
    for name, p in parts.items():
        module_name = name[: -len(".weight")]
        old = model.get_submodule(module_name)
        hf_module = neoj_to_hf_name(name, cfg.model_type)[: -len(".weight")]
        check_parts(hf_module, p, (old.out_features, old.in_features), spec)
        replace_linear(model, module_name, QuantLinear(p, spec, old.bias, device))
    model.init_buffers(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing a quantized checkpoint


class ShardWriter:
    """Writes tensors into safetensors shards of bounded size, each atomically (temp file + rename)."""

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.directory, self.max_shard_bytes = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        write_safetensors(self.pending, self.directory / name)
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self, metadata: dict) -> list[str]:
        """Writes what is left and, for several shards, the index; returns the files written."""
        self._flush()
        if len(self.shards) == 1:  # one shard: the plain file name every loader looks for first
            (self.directory / self.shards[0][0]).replace(self.directory / "model.safetensors")
            return ["model.safetensors"]
        index = {"metadata": metadata, "weight_map": {k: name for name, keys in self.shards for k in keys}}
        tmp = self.directory / "model.safetensors.index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(self.directory / "model.safetensors.index.json")
        return [name for name, _ in self.shards] + ["model.safetensors.index.json"]


def quantize_checkpoint(source: Path, out: Path, spec: QuantSpec, dtype: torch.dtype = torch.bfloat16,
                        max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> list[str]:
    """Writes a quantized copy of the checkpoint in `source` to `out`, streaming; returns the files written.

    Non-linear tensors (embeddings, layer norms, biases) are stored in `dtype`. The source is read one
    tensor at a time, so memory stays near one shard of output plus the largest tensor. `out` must be
    new or empty unless `overwrite`, which deletes the model files already there (never `source`).
    """
    import shutil

    from .checks import clear_model_files, prepare_output_dir, same_directory
    from .config import load_config
    from .weights import SIDE_FILES, build_meta, load_state_into, neoj_to_hf_name, weight_files

    source, out = Path(source), Path(out)
    if QuantSpec.read(source) is not None:
        raise NeojError(f"{source} is already quantized; quantize the full-precision checkpoint instead")
    if same_directory(out, source):
        raise NeojError("--out must be a new directory, not the checkpoint being quantized")
    prepare_output_dir(out, overwrite=overwrite)
    cfg = load_config(source)
    files = weight_files(source)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_model_files(out)
    writer = ShardWriter(out, max_shard_bytes)
    model = build_meta(cfg)

    def take(name: str, tensor: torch.Tensor) -> None:
        key = neoj_to_hf_name(name, cfg.model_type)
        if spec.quantizes(name):
            for part, t in quantize_weight(tensor, spec).items():
                writer.add(f"{key[: -len('.weight')]}.{part}", t)
        else:
            writer.add(key, tensor.to(dtype))
        if name == "wte.weight" and cfg.tie_word_embeddings:  # the tied head gets its own quantized copy
            for part, t in quantize_weight(tensor, spec).items():
                writer.add(f"lm_head.{part}", t)

    load_state_into(model, files, dtype, torch.device("cpu"), transform=lambda n, t: take(n, t))
    written = writer.close({"quantization": json.dumps(spec.to_dict())})
    for name in SIDE_FILES:
        if (source / name).exists() and name != QUANTIZATION_FILE:
            shutil.copyfile(source / name, out / name)
    from .tokenizer import Tokenizer

    if not (out / "tokenizer.json").exists() and not (out / "vocab.json").exists():
        Tokenizer.from_dir(source).save(out)
    (out / QUANTIZATION_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")  # last: marks it complete
    return written + [QUANTIZATION_FILE]
