"""Training checkpoints that survive a crash at any instant, and the HF-format export of a trained model.

A checkpoint is one file written to a temporary name, flushed to disk, then renamed over the old one:
a kill, a full disk or a write error at any point leaves the previous checkpoint whole.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import NeojError
from ..tokenizer import bundled_gpt2_dir
from ..weights import neoj_to_hf_name, write_safetensors

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


class CheckpointWriteError(NeojError):
    """A checkpoint could not be written; the previous one is untouched."""


def _serialize(obj, f) -> None:
    torch.save(obj, f)


def atomic_save(obj, path: str | Path) -> None:
    """Writes `obj` with torch.save to path.tmp, fsyncs it, then renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _serialize(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):
            hint = " (disk full)" if getattr(exc, "errno", None) == errno.ENOSPC else ""
            raise CheckpointWriteError(f"could not write {path}{hint}: {exc}") from exc
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path) -> dict:
    """Returns a training checkpoint's contents, or raises NeojError if it is unreadable."""
    path = Path(path)
    if not path.exists():
        raise NeojError(f"no checkpoint to resume from: {path} does not exist")
    try:
        # Our own checkpoints hold only tensors, numbers, strings and tuples: weights_only=True reads them,
        # and a tampered checkpoint still cannot run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NeojError(f"checkpoint {path} could not be read: {exc}") from exc


def rng_state() -> dict:
    """Returns this process's random number generator states."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores the states rng_state() returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, directory: str | Path,
              dtype: torch.dtype | None = None) -> None:
    """Writes config.json and model.safetensors from a neoj state dict, as save_pretrained would."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().cpu()
        tensors[neoj_to_hf_name(name, cfg.model_type)] = (t.to(dtype) if dtype is not None else t).contiguous()
    write_safetensors(tensors, directory / "model.safetensors")
    cfg.save(directory)


def copy_tokenizer(source: str | Path | None, directory: str | Path) -> None:
    """Copies the source model's tokenizer files (or neoj's GPT-2 ones) into `directory`."""
    directory = Path(directory)
    src = Path(source) if source is not None else None
    copied = False
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).exists() and (src / name).resolve() != (directory / name).resolve():
                shutil.copyfile(src / name, directory / name)
                copied = True
    if not copied:
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(bundled_gpt2_dir() / name, directory / name)
