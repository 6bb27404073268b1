"""Checkpoint readers: each format's file becomes a stream of StoredTensor, read only when asked.

A StoredTensor knows its key, dtype and shape from the file's header before any value is read, so the
loader can refuse a tensor that does not fit, skip one it does not need, or take one in row blocks
instead of whole (RowSink), without ever holding more than it keeps. The formats:
- safetensors with plain file reads (read_safetensors): the file's pages stay out of this process's
  memory, and a dtype change goes through a small staging buffer, so converting an fp32 file to bf16
  never holds more than the bf16 model plus a few MiB;
- safetensors memory-mapped (map_safetensors): when nothing is to be converted, the file's pages are
  the weights (no copy; private pages: writes never reach the file);
- PyTorch .bin (read_torch_bin), through torch.load(weights_only=True): a checkpoint can never run code.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Bytes read at a time when a tensor is converted on the way in or handed over in row blocks.
STAGING_BYTES = 16 << 20


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """Returns (tensor entries, data start offset) of a safetensors file, validated against its size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{file} is corrupt or truncated: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file} is corrupt: its safetensors header is not valid JSON") from exc
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            numel = 1
            for dim in entry["shape"]:
                numel *= dim
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file} is corrupt: bad header entry for tensor {key!r}") from exc
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{file} is corrupt: tensor {key!r} has {end - begin} bytes for shape {entry['shape']}")
        if data_start + end > size:
            raise CheckpointError(
                f"{file} is truncated: tensor {key!r} ends at byte {data_start + end} but the file has {size} "
                "(an interrupted download? delete it and download again)"
            )
    return header, data_start


def stored_in(file: Path, dtype: torch.dtype) -> bool:
    """Returns True when every tensor in a safetensors file is stored in `dtype`."""
    header, _ = read_safetensors_header(file)
    return all(SAFETENSORS_DTYPES[e["dtype"]] == dtype for e in header.values())


class RowSink:
    """Stands for a 2-D tensor that is handed over a few MiB of rows at a time instead of whole.

    `take(start_row, rows)` receives each block of rows in order, in the checkpoint's dtype (the block
    is reused afterwards: copy what you keep); `finish()` returns what the loader keeps for the tensor.
    Quantizing GPT-J's 826 MB fp32 LM head this way never holds it whole.
    """

    def __init__(self, take: Callable[[int, torch.Tensor], None], finish: Callable[[], torch.Tensor | None]):
        self.take, self.finish = take, finish


class StoredTensor:
    """One tensor of a checkpoint, known by its header; its values are read only when asked.

    Read it (read, or read_rows where streams_rows) before taking the next one from its reader: the
    readers of one file share its open handle.
    """

    streams_rows = False  # True where read_rows hands the tensor over in row blocks

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple, file: Path | None):
        self.key, self.dtype, self.shape, self.file = key, dtype, tuple(shape), file

    def describe(self) -> str:
        """Returns the tensor's key and file, for error messages."""
        return f"{self.key} (in {self.file.name})" if self.file is not None else self.key

    def check_fits(self, want: tuple) -> None:
        """Raises CheckpointError unless this tensor can fill a parameter of shape `want`."""
        if self.shape != tuple(want):
            raise CheckpointError(
                f"{self.file}: tensor {self.key!r} has shape {list(self.shape)} but the config needs {list(want)}; "
                "the weights do not match config.json"
            )
        if not (self.dtype.is_floating_point or self.dtype == torch.int8 or self.dtype == torch.uint8):
            raise CheckpointError(f"{self.file}: tensor {self.key!r} has dtype {self.dtype}, expected floating point")

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the values on the CPU, or where they lie: in `dtype` when the reader converts while
        reading (it saves a copy), else as stored."""
        raise NotImplementedError

    def read_rows(self, sink: RowSink):
        """Hands the rows to `sink` block by block; returns sink.finish()."""
        raise NotImplementedError(f"{type(self).__name__} is read whole")

    def read_slice(self, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the values of indices [start, stop) along `dim` (0: rows, 1: columns), in `dtype` (None: as
        stored), as a tensor of their own: tensor parallelism keeps only its slice, never the whole tensor.
        Readers that can read just the slice (FileTensor, MappedTensor) override this."""
        part = self.read(dtype).narrow(dim, start, stop - start)
        if dtype is not None and part.dtype != dtype:
            return part.to(dtype).contiguous()
        return part.clone(memory_format=torch.contiguous_format)


class InMemoryTensor(StoredTensor):
    """A tensor already in memory (a .bin's entry, or drawn at random), handed over as it is."""

    def __init__(self, key: str, tensor: torch.Tensor, file: Path | None = None):
        super().__init__(key, tensor.dtype, tuple(tensor.shape), file)
        self.tensor = tensor

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensor


class MappedTensor(StoredTensor):
    """A tensor of a memory-mapped safetensors file: reading it maps its pages, copying nothing."""

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple, file: Path, handle):
        super().__init__(key, dtype, shape, file)
        self.handle = handle

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.handle.get_tensor(self.key)

    def read_slice(self, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        view = self.handle.get_slice(self.key)  # reads only the slice's bytes
        part = view[start:stop] if dim == 0 else view[:, start:stop]
        return part if dtype is None or part.dtype == dtype else part.to(dtype)


class FileTensor(StoredTensor):
    """A tensor of a safetensors file read with plain reads, converted on the way in or in row blocks."""

    streams_rows = True

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple, file: Path, reader: "_PlainReader", offset: int):
        super().__init__(key, dtype, shape, file)
        self.reader, self.offset = reader, offset

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dest = torch.empty(self.shape, dtype=dtype if dtype is not None else self.dtype)
        self.reader.f.seek(self.offset)
        return self._read_into(dest)

    def _read_into(self, dest: torch.Tensor) -> torch.Tensor:
        """Fills dest with the next dest.numel() values of the file, converting through the staging buffer."""
        if dest.dtype == self.dtype:
            self.reader.read_exactly(dest, self.key)
            return dest
        flat = dest.view(-1)
        staging = self.reader.staging(self.dtype)
        for lo in range(0, flat.numel(), staging.numel()):
            chunk = staging[: min(staging.numel(), flat.numel() - lo)]
            self.reader.read_exactly(chunk, self.key)
            flat[lo : lo + chunk.numel()].copy_(chunk)
        return dest

    def read_slice(self, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows: one seek and one read of just those rows. Columns: the rows go through the staging buffer a
        block at a time, and only the slice's columns are kept."""
        dtype = dtype if dtype is not None else self.dtype
        if dim == 0:
            row = self.dtype.itemsize
            for size in self.shape[1:]:
                row *= size
            dest = torch.empty((stop - start, *self.shape[1:]), dtype=dtype)
            self.reader.f.seek(self.offset + start * row)
            return self._read_into(dest)
        rows, cols = self.shape
        dest = torch.empty(rows, stop - start, dtype=dtype)
        step = max(1, STAGING_BYTES // max(1, cols * self.dtype.itemsize))
        staging = torch.empty(min(step, rows), cols, dtype=self.dtype)
        self.reader.f.seek(self.offset)
        for first in range(0, rows, step):
            block = staging[: min(step, rows - first)]
            self.reader.read_exactly(block, self.key)
            dest[first : first + block.shape[0]] = block[:, start:stop]
        return dest

    def read_rows(self, sink: RowSink):
        rows, cols = self.shape
        step = max(1, STAGING_BYTES // max(1, cols * self.dtype.itemsize))
        staging = torch.empty(min(step, rows), cols, dtype=self.dtype)
        self.reader.f.seek(self.offset)
        for start in range(0, rows, step):
            block = staging[: min(step, rows - start)]
            self.reader.read_exactly(block, self.key)
            sink.take(start, block)
        return sink.finish()


class _PlainReader:
    """One open safetensors file and the staging buffer its conversions share."""

    def __init__(self, file: Path, f):
        self.file, self.f = file, f
        self._staging: torch.Tensor | None = None

    def staging(self, dtype: torch.dtype) -> torch.Tensor:
        if self._staging is None or self._staging.dtype != dtype:
            self._staging = torch.empty(STAGING_BYTES // dtype.itemsize, dtype=dtype)
        return self._staging

    def read_exactly(self, dest: torch.Tensor, key: str) -> None:
        """Fills a contiguous CPU tensor with the next bytes of the file."""
        if not dest.numel():
            return
        view = memoryview(dest.view(-1).view(torch.uint8).numpy())
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{self.file} is truncated while reading tensor {key!r}")
            got += n


def read_safetensors(file: Path) -> Iterator[StoredTensor]:
    """Yields the tensors of a safetensors file in its header's order, each read with plain file reads."""
    header, data_start = read_safetensors_header(file)
    with open(file, "rb", buffering=0) as f:
        reader = _PlainReader(file, f)
        for key, entry in header.items():
            yield FileTensor(key, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), file, reader,
                             data_start + entry["data_offsets"][0])


def map_safetensors(file: Path) -> Iterator[StoredTensor]:
    """Yields the tensors of a safetensors file memory-mapped (safetensors' own order)."""
    from safetensors import safe_open

    header, _ = read_safetensors_header(file)  # validates sizes first: clear errors for bad files
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():
            entry = header[key]
            yield MappedTensor(key, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), file, f)


def read_torch_bin(file: Path) -> Iterator[StoredTensor]:
    """Yields the tensors of a pytorch_model.bin, refusing anything but plain tensors."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file} contains pickled objects other than tensors and was refused (neoj never runs code from "
            f"a checkpoint): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is truncated or corrupt and could not be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a dictionary of tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor")
        yield InMemoryTensor(key, value, file)


def read_checkpoint(files: Iterable[Path], map_dtype: torch.dtype | None = None) -> Iterator[StoredTensor]:
    """Yields every tensor of a checkpoint's weight files, in order, each file with the reader of its format.

    With `map_dtype`, a safetensors file whose tensors are all stored in that dtype is memory-mapped
    (nothing to convert: the weights load in milliseconds and take the model's size, once).
    """
    for file in files:
        log.info("reading %s", file)
        if file.suffix != ".safetensors":
            yield from read_torch_bin(file)
        elif map_dtype is not None and stored_in(file, map_dtype):
            yield from map_safetensors(file)
        else:
            yield from read_safetensors(file)
