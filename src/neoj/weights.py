"""Checkpoint loading: find a model (local directory or Hub id), read its tensors, fill the model.

The model is built on the meta device and each tensor is read straight into its final dtype and
device, one at a time, so peak memory stays near the size of the loaded model. Pickled .bin files
go through torch.load(weights_only=True): a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from .config import ModelConfig, load_config
from .errors import CheckpointError
from .model import Transformer

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Files a model directory needs besides its weights (tokenizer files are optional: GPT-2's are shipped).
SIDE_FILES = ["config.json", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "quantization.json"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# transformers' names -> neoj's. One table for both families: GPT-Neo nests q/k/v under
# attn.attention and calls its MLP c_fc/c_proj; GPT-J uses attn.q_proj and fc_in/fc_out.
_HF_TO_NEOJ = [
    (re.compile(r"^transformer\.h\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^transformer\."), ""),
    (re.compile(r"\.attn\.attention\."), ".attn."),
    (re.compile(r"\.mlp\.c_fc\."), ".mlp.fc_in."),
    (re.compile(r"\.mlp\.c_proj\."), ".mlp.fc_out."),
]
# Causal-mask buffers that old checkpoints saved alongside the weights; they carry no information.
_IGNORED = re.compile(r"^blocks\.\d+\.attn\.(bias|masked_bias)$")


def hf_to_neoj_name(name: str) -> str:
    """Returns neoj's parameter name for a transformers checkpoint key."""
    for pattern, repl in _HF_TO_NEOJ:
        name = pattern.sub(repl, name)
    return name


def neoj_to_hf_name(name: str, model_type: str) -> str:
    """Returns the transformers checkpoint key for a neoj parameter name."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
    if not m:
        return "transformer." + name
    rest = m.group(2)
    if model_type == "gpt_neo":
        rest = re.sub(r"^attn\.", "attn.attention.", rest)
        rest = rest.replace("mlp.fc_in.", "mlp.c_fc.").replace("mlp.fc_out.", "mlp.c_proj.")
    return f"transformer.h.{m.group(1)}.{rest}"


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint
#
# Every place that takes a model by name (neoj.load, every command's --model, neoj info, neoj quantize,
# neoj merge, neoj finetune) resolves it here, so a name means the same everywhere and a bad one gets
# the same one-line error. Accepted, in this order:
#   - an existing directory (a local directory always wins over a name that could mean something else);
#   - "builtin": the model shipped inside neoj (src/neoj/builtin). A Hub id needs owner/name, so it can
#     never be "builtin"; a directory called builtin in the current directory still wins, as any local
#     directory does over a Hub id of the same spelling (write ./builtin to say so explicitly);
#   - "random:PRESET": random weights of a published shape (handled by neoj.load, no checkpoint);
#   - a Hub id, owner/name, downloaded into (or found in) the Hugging Face cache.
# Anything that looks like a path (./x, ../x, /x, ~/x, a/b/c, x/) and does not exist is "no such
# directory", never sent to the Hub.

BUILTIN_NAME = "builtin"
RANDOM_PREFIX = "random:"


def _presets() -> str:
    from .config import PRESETS

    return ", ".join(PRESETS)


def model_forms() -> str:
    """Returns the sentence listing what a model argument accepts, for error messages."""
    return (f"a model is a checkpoint directory, a Hub id (owner/name, e.g. EleutherAI/gpt-neo-125m), "
            f"{BUILTIN_NAME} (the model shipped with neoj) or {RANDOM_PREFIX}PRESET (random weights; PRESET is one "
            f"of {_presets()})")


def builtin_model_dir() -> Path | None:
    """Returns the directory of the model shipped inside neoj, if this install has one."""
    path = Path(__file__).parent / "builtin"
    return path if (path / "config.json").exists() else None


def looks_like_path(name: str) -> bool:
    """Returns True when `name` can only be a filesystem path, never a Hub id.

    That is: it starts with ".", "~" or a separator (./x, ../x, /x, ~/x), is absolute, ends with a
    separator, or holds two separators or more (a/b/c). A Hub id is exactly owner/name.
    """
    seps = (os.sep,) + ((os.altsep,) if os.altsep else ()) + (("/",) if "/" not in (os.sep, os.altsep) else ())
    return (name.startswith((".", "~") + seps) or os.path.isabs(name) or name.endswith(seps)
            or sum(name.count(sep) for sep in seps) >= 2)


def hub_id_problem(name: str) -> str | None:
    """Returns why `name` is not a valid Hub id (owner/name), or None when it is one."""
    if name.count("/") != 1:
        return "a Hub id is owner/name"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        return str(exc).splitlines()[0]
    return None


def local_model_dir(name_or_path: str | os.PathLike | None) -> Path | None:
    """Returns the local directory a model name means (an existing directory, or builtin), or None for a Hub id.

    Raises CheckpointError, naming the input and what is accepted, for anything else: a path that does
    not exist, a file, random:PRESET (it has no checkpoint), or a name that is not a valid Hub id.
    """
    if name_or_path is None:
        name_or_path = BUILTIN_NAME
    name = os.fspath(name_or_path)
    if not name.strip():
        raise CheckpointError(f"the model name is empty; {model_forms()}")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if name == BUILTIN_NAME and not isinstance(name_or_path, os.PathLike):
        builtin = builtin_model_dir()
        if builtin is None:
            raise CheckpointError("this install of neoj has no built-in model (src/neoj/builtin is missing); "
                                  "pass another model: " + model_forms())
        return builtin
    if isinstance(name_or_path, os.PathLike) or looks_like_path(name):
        raise CheckpointError(f"no such directory: {name!r} (it is neither a local directory nor a Hub id); "
                              + model_forms())
    if name.startswith(RANDOM_PREFIX):
        raise CheckpointError(f"{name!r} has random weights and no checkpoint to read; this needs a checkpoint "
                              f"directory, a Hub id or {BUILTIN_NAME}")
    problem = hub_id_problem(name)
    if problem is not None:
        from .config import PRESETS

        hint = (f" ({name} is a preset: {RANDOM_PREFIX}{name} gives random weights of its shape)"
                if name.lower() in PRESETS else "")
        raise CheckpointError(f"unknown model {name!r}: not an existing directory, {BUILTIN_NAME}, "
                              f"{RANDOM_PREFIX}PRESET or a valid Hub id{hint}; " + model_forms())
    return None


def resolve_model_dir(name_or_path: str | os.PathLike | None, revision: str | None = None) -> Path:
    """Returns a local directory holding the checkpoint: the path itself, the built-in model, or the Hub's copy.

    See the rules above; a Hub id is downloaded into the Hugging Face cache, or found there.
    """
    local = local_model_dir(name_or_path)
    return local if local is not None else download(os.fspath(name_or_path), revision=revision)


def _pick_weight_patterns(files: list[str]) -> list[str]:
    """Returns the file patterns to fetch: safetensors when a repo has them, otherwise .bin."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors", "model.safetensors.index.json"]
    return ["*.bin", "pytorch_model.bin.index.json"]


def _network_errors() -> tuple[type[BaseException], ...]:
    """Returns the exception types huggingface_hub raises when the Hub cannot be reached at all.

    huggingface_hub talks HTTP through httpx (httpx2 in recent releases, requests before 0.26); the
    builtins cover OfflineModeIsEnabled (a ConnectionError) and socket errors.
    """
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, attrs in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, attr) for attr in attrs if hasattr(mod, attr)]
    return tuple(errors)


def _reason(exc: BaseException) -> str:
    """Returns the first line of an exception's message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _offline_help(repo_id: str) -> str:
    return (f"to work offline set HF_HUB_OFFLINE=1 (models already in the Hugging Face cache are then used without "
            f"the network); run `neoj download {repo_id}` where there is a network, or pass a local directory")


def download(repo_id: str, revision: str | None = None, progress: bool = True,
             patterns: list[str] | None = None) -> Path:
    """Downloads (or finds in the HF cache) a checkpoint from the Hub; returns its local directory.

    Honours HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_TOKEN like every huggingface_hub
    tool. `patterns` restricts the files fetched (default: the side files and one weight format).

    The Hub is asked once, without retries, before anything else (huggingface_hub's listing calls retry
    connection errors five times with backoff, about 30 s on a machine with no network). When that one
    request cannot connect, the model is taken from the cache if it is there, and otherwise the error says
    so at once, pointing at HF_HUB_OFFLINE=1.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    problem = hub_id_problem(repo_id)
    if problem is not None:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub id ({problem}); a Hub id is owner/name, such as "
                              "EleutherAI/gpt-neo-125m")
    offline = bool(constants.HF_HUB_OFFLINE)
    unreachable: str | None = None  # why the Hub could not be asked, when it could not
    files: list[str] | None = None
    try:
        if not offline:
            try:
                info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
                files = [s.rfilename for s in info.siblings or []]
            except (RepositoryNotFoundError, RevisionNotFoundError):
                raise
            except HfHubHTTPError as exc:  # the Hub answered, with an error (5xx, 401...): try the cache
                status = getattr(getattr(exc, "response", None), "status_code", None)
                unreachable = f"it answered HTTP {status}" if status else _reason(exc)
            except _network_errors() as exc:
                unreachable = _reason(exc)
        if patterns is None:
            patterns = SIDE_FILES + (_pick_weight_patterns(files) if files is not None
                                     else ["*.safetensors", "*.bin", "*.index.json"])
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                  local_files_only=offline or unreachable is not None,
                                  tqdm_class=None if progress else _NoProgress)
    except GatedRepoError as exc:
        raise CheckpointError(f"{repo_id!r} is gated on the Hugging Face Hub: accept its terms on "
                              f"https://huggingface.co/{repo_id} and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private: set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face Hub") from exc
    except LocalEntryNotFoundError as exc:
        if type(exc).__name__ == "IncompleteSnapshotError":
            raise CheckpointError(f"the cached copy of {repo_id!r} is incomplete (an interrupted download?) and the "
                                  f"Hub cannot be reached; run `neoj download {repo_id}` with a network") from exc
        if offline:
            raise CheckpointError(
                f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; run `neoj download "
                f"{repo_id}` where there is a network (or unset HF_HUB_OFFLINE), or pass a local directory"
            ) from exc
        raise CheckpointError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({unreachable}) and {repo_id!r} is not in the "
            f"local Hugging Face cache; " + _offline_help(repo_id)
        ) from exc
    except HFValidationError as exc:
        raise CheckpointError(f"invalid Hub id or revision for {repo_id!r}: {_reason(exc)}") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading {repo_id!r} failed: {_reason(exc)}") from exc
    except _network_errors() as exc:
        raise CheckpointError(f"downloading {repo_id!r} failed: the connection to {constants.ENDPOINT} broke "
                              f"({_reason(exc)}); run the command again to resume") from exc
    if unreachable is not None:
        log.warning("cannot reach the Hugging Face Hub (%s): using the cached copy of %s; set HF_HUB_OFFLINE=1 "
                    "to skip the check", unreachable, repo_id)
    return Path(local)


def download_config(repo_id: str, revision: str | None = None) -> Path:
    """Returns the config.json of a Hub model, from the cache or fetched alone (no weights)."""
    return download(repo_id, revision=revision, progress=False, patterns=["config.json"]) / "config.json"


class _NoProgress:  # a tqdm stand-in that shows nothing
    def __init__(self, *args, **kwargs):
        pass

    def update(self, *args):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def weight_files(directory: Path) -> list[Path]:
    """Returns the checkpoint's weight files, preferring safetensors, following shard indexes."""
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.exists():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            weight_map = json.loads(file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{file} is not a valid shard index (needs a 'weight_map' object)") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(f"{file} names shards that are not in {directory}: {', '.join(missing)}")
        return [directory / s for s in shards]
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


# ---------------------------------------------------------------------------------------------
# Reading tensors


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
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
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


def iter_safetensors(file: Path, wanted: Callable[..., torch.Tensor | None]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, tensor) for a safetensors file, reading each tensor with plain file reads.

    `wanted(key, dtype, shape)` returns the CPU tensor to fill (of any floating dtype: the bytes are
    converted on the way in), or None to skip the tensor. Plain reads instead of mmap keep the file's
    pages out of this process's memory, and a dtype change goes through a small staging buffer, so
    converting an fp32 file to bf16 never holds more than the bf16 model plus a few MiB.
    """
    header, data_start = read_safetensors_header(file)
    staging: torch.Tensor | None = None
    with open(file, "rb", buffering=0) as f:
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            src_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            dest = wanted(key, src_dtype, tuple(entry["shape"]))
            if dest is None:
                continue
            f.seek(data_start + begin)
            if isinstance(dest, RowSink):
                yield key, _read_rows(f, dest, src_dtype, tuple(entry["shape"]), file, key)
                continue
            if dest.dtype == src_dtype:
                _read_exactly(f, dest, file, key)
            else:
                flat = dest.view(-1)
                step = _STAGING_BYTES // src_dtype.itemsize
                if staging is None or staging.dtype != src_dtype:
                    staging = torch.empty(step, dtype=src_dtype)
                for lo in range(0, flat.numel(), step):
                    chunk = staging[: min(step, flat.numel() - lo)]
                    _read_exactly(f, chunk, file, key)
                    flat[lo : lo + chunk.numel()].copy_(chunk)
            yield key, dest


_STAGING_BYTES = 16 << 20


class RowSink:
    """Stands for a 2-D tensor that is handed over a few MiB of rows at a time instead of whole.

    `take(start_row, rows)` receives each block of rows in order, in the checkpoint's dtype (the block
    is reused afterwards: copy what you keep); `finish()` returns what load_state_into keeps for the
    tensor. Quantizing GPT-J's 826 MB fp32 LM head this way never holds it whole.
    """

    def __init__(self, take: Callable[[int, torch.Tensor], None], finish: Callable[[], torch.Tensor | None]):
        self.take, self.finish = take, finish


def _read_rows(f, sink: RowSink, src_dtype: torch.dtype, shape: tuple, file: Path, key: str):
    rows, cols = shape
    step = max(1, _STAGING_BYTES // max(1, cols * src_dtype.itemsize))
    staging = torch.empty(min(step, rows), cols, dtype=src_dtype)
    for start in range(0, rows, step):
        block = staging[: min(step, rows - start)]
        _read_exactly(f, block, file, key)
        sink.take(start, block)
    return sink.finish()


def _read_exactly(f, dest: torch.Tensor, file: Path, key: str) -> None:
    """Fills a contiguous CPU tensor with the next bytes of `f`."""
    if not dest.numel():
        return
    view = memoryview(dest.view(-1).view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{file} is truncated while reading tensor {key!r}")
        got += n


def iter_torch_bin(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, tensor) from a pytorch_model.bin, refusing anything but plain tensors."""
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
        yield key, value


# ---------------------------------------------------------------------------------------------
# Filling a model


def _all_dtype(file: Path, dtype: torch.dtype) -> bool:
    """Returns True when every tensor in a safetensors file is stored in `dtype`."""
    header, _ = read_safetensors_header(file)
    return all(_SAFETENSORS_DTYPES[e["dtype"]] == dtype for e in header.values())


def _expected_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Returns the model's parameters by name, the tied LM head left out (it is the embedding)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params


def load_state_into(model: Transformer, files: list[Path], dtype: torch.dtype, device: torch.device,
                    transform: Callable | None = None) -> None:
    """Fills a meta-device model from checkpoint files; raises CheckpointError naming any bad tensor.

    `transform(name, tensor)` may replace a loaded tensor before it is kept (converting it to the dtype
    and device is then its job), or return None when it has taken the tensor itself (quantization puts
    a quantized layer in place of the module).
    """
    expected = _expected_tensors(model)
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []

    def check(key: str, src_dtype: torch.dtype, shape: tuple, file: Path) -> str | None:
        name = hf_to_neoj_name(key)
        if _IGNORED.match(name) or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            return None
        if name not in expected:
            unexpected.append(f"{key} (in {file.name})")
            return None
        want = tuple(expected[name].shape)
        if shape != want:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {list(shape)} but the config needs {list(want)}; "
                "the weights do not match config.json"
            )
        if not (src_dtype.is_floating_point or src_dtype == torch.int8 or src_dtype == torch.uint8):
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {src_dtype}, expected floating point")
        return name

    def keep(name: str, tensor: torch.Tensor) -> None:
        if transform is not None:
            tensor = transform(name, tensor)
        elif tensor.dtype != dtype or tensor.device != device:
            tensor = tensor.to(device=device, dtype=dtype)
        loaded[name] = tensor

    for file in files:
        log.info("reading %s", file)
        if file.suffix == ".safetensors" and transform is None and device.type == "cpu" and _all_dtype(file, dtype):
            # Nothing to convert: map the file and use its pages as the weights (no copy, loads in
            # milliseconds, memory = the model's size). Pages are private: writes never reach the file.
            from safetensors import safe_open

            header, _ = read_safetensors_header(file)  # validates sizes first: clear errors for bad files
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    entry = header[key]
                    name = check(key, _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), file)
                    if name is not None:
                        keep(name, f.get_tensor(key))
        elif file.suffix == ".safetensors":
            names: dict[str, str] = {}
            sunk: set[str] = set()

            def wanted(key, src_dtype, shape, file=file, names=names, sunk=sunk):
                name = check(key, src_dtype, shape, file)
                if name is None:
                    return None
                names[key] = name
                # A transform may take a tensor in row blocks (RowSink) rather than whole.
                sink = transform.row_sink(name, shape) if hasattr(transform, "row_sink") else None
                if sink is not None:
                    sunk.add(name)
                    return sink
                # Read straight into the target dtype unless a transform wants the checkpoint's values.
                return torch.empty(shape, dtype=src_dtype if transform is not None else dtype)

            for key, tensor in iter_safetensors(file, wanted):
                if names[key] in sunk:
                    loaded[names[key]] = tensor  # the transform took it row by row (None: module replaced)
                else:
                    keep(names[key], tensor)
        else:
            for key, tensor in iter_torch_bin(file):
                name = check(key, tensor.dtype, tuple(tensor.shape), file)
                if name is not None:
                    keep(name, tensor)

    if unexpected:
        raise CheckpointError(
            f"checkpoint has tensors this {model.config.model_type} config does not use: "
            + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        )
    missing = [neoj_to_hf_name(n, model.config.model_type) for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} tensors, e.g. " + ", ".join(missing[:10])
            + "; is it complete and does it match config.json?"
        )
    for name, tensor in loaded.items():
        if tensor is not None:
            _assign(model, name, tensor)
    model.tie_weights()
    model.init_buffers(device)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replaces a (meta) parameter or submodule attribute with a loaded tensor."""
    *path, leaf = name.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
    if not isinstance(tensor, torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    setattr(module, leaf, tensor)


@contextlib.contextmanager
def _no_init():
    """Skips nn modules' weight initialisation while building on the meta device.

    Initialising meta tensors does no work but makes torch import ~800 modules on first use (about 2 s
    and 70 MB per process); every weight is overwritten by the checkpoint anyway.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_meta(cfg: ModelConfig) -> Transformer:
    """Returns the model with every parameter on the meta device (no memory), to be filled by loading."""
    with _no_init():
        return Transformer(cfg)


def load_model(directory: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: ModelConfig | None = None, transform: Callable | None = None) -> Transformer:
    """Returns a Transformer built from a checkpoint directory's config.json and weights."""
    directory = Path(directory)
    cfg = config or load_config(directory)
    device = torch.device(device)
    files = weight_files(directory)
    model = build_meta(cfg)
    load_state_into(model, files, dtype, device, transform)
    return model.eval()


def random_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, transform: Callable | None = None, model: Transformer | None = None) -> Transformer:
    """Returns a model with GPT-2-style random init (std 0.02), for shapes with no checkpoint.

    `transform` works as in load_state_into: tensors are made one at a time, so a quantizing transform
    never holds the full-precision model. `model` is the meta-device model to fill (default: a new one).
    """
    # On a GPU (and no transform) the tensors are drawn there: a 6B model in seconds, not minutes. The
    # values then differ from the CPU's for the same seed.
    at = torch.device(device) if transform is None and torch.device(device).type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=at).manual_seed(seed)
    model = model if model is not None else build_meta(cfg)
    for name, p in _expected_tensors(model).items():
        if name.endswith("bias"):
            t = torch.zeros(p.shape, device=at)
        elif ".ln_" in name or name.startswith("ln_f"):
            t = torch.ones(p.shape, device=at)
        else:
            t = torch.empty(p.shape, device=at).normal_(0.0, 0.02, generator=gen)
        t = transform(name, t) if transform is not None else t.to(device=device, dtype=dtype)
        if t is not None:
            _assign(model, name, t)
    model.tie_weights()
    model.init_buffers(device)
    return model.eval()


def state_dict_for_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Returns the model's weights under transformers' names (what save_pretrained would write)."""
    out = {}
    for name, tensor in _expected_tensors(model).items():
        out[neoj_to_hf_name(name, model.config.model_type)] = tensor.detach().contiguous()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Writes `tensors` to the safetensors file `path` atomically (a crash never leaves a half-written file),
    readable as any other file the user writes: safetensors creates its files 0600, whatever the umask."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_checkpoint(model: Transformer, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Writes config.json and model.safetensors that transformers' from_pretrained loads unchanged."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_for_hf(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_safetensors(tensors, directory / "model.safetensors")
    model.config.save(directory)
