"""Weight-only quantization, in one import: per-channel int8 and group-wise int4 linear layers, on CPU and CUDA.

Every linear layer and the LM head can be stored as integers with floating-point scales; activations,
layer norms, attention and the token embedding keep the compute dtype. The work is done in small
modules, layered one way:
- format: QuantSpec, and weights to and from their portable integer parts (the checkpoint format);
- layer: QuantLinear, the layer (its kernels are chosen by neoj.linear), and quantize_model;
- malloc: keeping glibc from holding freed full-precision tensors while quantizing;
- loading: quantizing while a checkpoint streams in, and reading a quantized checkpoint;
- writing: `neoj quantize`, writing a quantized checkpoint.
This module re-exports their public names, so `from neoj.quantize import ...` keeps working.
"""

from __future__ import annotations

from ..weights.writing import ShardWriter
from .malloc import return_freed_memory_promptly, trim_heap
from .format import (CHUNK_ROWS, GROUP_SIZES, QUANTIZATION_FILE, SCHEMES, QuantSpec, check_parts, dequantize,
                           dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, quantize_weight, unpack_int4)
from .layer import QuantLinear, decode_read_bytes, quantize_model, replace_linear
from .loading import PutQuantized, QuantizedLayer, StreamingQuantizer, load_quantized, put_quantized, read_quantized
from .writing import quantize_checkpoint

__all__ = [
    "CHUNK_ROWS", "GROUP_SIZES", "PutQuantized", "QUANTIZATION_FILE", "SCHEMES", "QuantLinear", "QuantSpec",
    "QuantizedLayer",
    "ShardWriter", "StreamingQuantizer", "check_parts", "decode_read_bytes", "dequantize", "dequantize_int4",
    "dequantize_int8", "load_quantized", "put_quantized", "quantize_checkpoint", "quantize_int4", "quantize_int8",
    "quantize_model", "quantize_weight", "read_quantized", "replace_linear", "return_freed_memory_promptly",
    "trim_heap", "unpack_int4",
]
