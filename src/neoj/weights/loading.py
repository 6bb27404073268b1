"""Filling a model: a stream of stored tensors (any reader's) becomes the weights of a meta-device model.

The model is built on the meta device and each tensor is read straight into its final dtype and
device, one at a time, so peak memory stays near the size of the loaded model. fill_model is the one
place that decides which tensors a checkpoint must have: whatever the format, a tensor that does not
fit, one the model does not use and one that is missing get the same errors. Random weights are one
more stream (random_tensors), so a random model is filled, and quantized, exactly as a loaded one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .files import weight_files
from .names import UNUSED_BUFFERS, hf_to_neoj_name, neoj_to_hf_name
from .readers import InMemoryTensor, StoredTensor, read_checkpoint
from ..config import ModelConfig, load_config
from ..errors import CheckpointError
from ..model import Transformer


def expected_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Returns the model's parameters by name, the tied LM head left out (it is the embedding)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    return params


def assign_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
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


def fill_model(model: Transformer, tensors: Iterable[StoredTensor], dtype: torch.dtype, device: torch.device,
               transform: Callable | None = None, expected: dict[str, torch.Tensor] | None = None) -> None:
    """Fills a meta-device model from stored tensors; raises CheckpointError naming any bad, unused or missing one.

    `transform(name, value)` may replace a loaded value before it is kept (converting it to the dtype
    and device is then its job), or return None when it has taken the value itself (quantization puts
    a quantized layer in place of the module). A transform with `row_sink(name, shape)` may take a
    tensor in row blocks instead (a RowSink; None: whole), where the reader streams rows.
    `expected` names the tensors to fill (default: expected_tensors(model)).
    """
    expected = expected_tensors(model) if expected is None else expected
    tied = model.config.tie_word_embeddings
    loaded: dict[str, torch.Tensor | None] = {}
    unexpected: list[str] = []
    for stored in tensors:
        name = hf_to_neoj_name(stored.key)
        if UNUSED_BUFFERS.match(name) or (name == "lm_head.weight" and tied and name not in expected):
            continue  # the tied head is the embedding: a checkpoint's copy of it carries nothing
        if name not in expected:
            unexpected.append(stored.describe())
            continue
        stored.check_fits(tuple(expected[name].shape))
        loaded[name] = _take(stored, name, dtype, device, transform)
    _check_complete(model, expected, loaded, unexpected)
    for name, tensor in loaded.items():
        if tensor is not None:
            assign_tensor(model, name, tensor)
    model.tie_weights()
    model.init_buffers(device)


def _take(stored: StoredTensor, name: str, dtype: torch.dtype, device: torch.device, transform: Callable | None):
    """Returns what is kept for one tensor: its value in `dtype` on `device`, or what the transform makes of it."""
    if transform is None:
        tensor = stored.read(dtype)  # readers that convert on the way in save a copy here
        return tensor if tensor.dtype == dtype and tensor.device == device else tensor.to(device=device, dtype=dtype)
    sink = transform.row_sink(name, stored.shape) if stored.streams_rows and hasattr(transform, "row_sink") else None
    if sink is not None:
        return stored.read_rows(sink)  # the transform took it row by row (None: module replaced)
    return transform(name, stored.read())  # in the checkpoint's dtype: the transform wants its values


def _check_complete(model: Transformer, expected: dict, loaded: dict, unexpected: list[str]) -> None:
    """Raises CheckpointError naming the tensors a model does not use, then those a checkpoint lacks."""
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


def load_state_into(model: Transformer, files: list[Path], dtype: torch.dtype, device: torch.device,
                    transform: Callable | None = None) -> None:
    """Fills a meta-device model from checkpoint files (see fill_model); memory-maps what needs no conversion."""
    map_dtype = dtype if transform is None and device.type == "cpu" else None
    fill_model(model, read_checkpoint(files, map_dtype), dtype, device, transform)


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


def random_tensors(model: Transformer, device: torch.device, seed: int) -> Iterator[StoredTensor]:
    """Yields GPT-2-style random values (std 0.02, zero biases, unit norms) for the model, one at a time on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in expected_tensors(model).items():
        if name.endswith("bias"):
            t = torch.zeros(p.shape, device=device)
        elif ".ln_" in name or name.startswith("ln_f"):
            t = torch.ones(p.shape, device=device)
        else:
            t = torch.empty(p.shape, device=device).normal_(0.0, 0.02, generator=gen)
        yield InMemoryTensor(neoj_to_hf_name(name, model.config.model_type), t)


def random_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, transform: Callable | None = None, model: Transformer | None = None) -> Transformer:
    """Returns a model with GPT-2-style random init, for shapes with no checkpoint.

    `transform` works as in fill_model: tensors are made one at a time, so a quantizing transform never
    holds the full-precision model. `model` is the meta-device model to fill (default: a new one).
    """
    device = torch.device(device)
    # On a GPU (and no transform) the tensors are drawn there: a 6B model in seconds, not minutes. The
    # values then differ from the CPU's for the same seed.
    at = device if transform is None and device.type == "cuda" else torch.device("cpu")
    model = model if model is not None else build_meta(cfg)
    fill_model(model, random_tensors(model, at, seed), dtype, device, transform)
    return model.eval()
