"""What a model name means: a local directory, the built-in model, random:PRESET, or a Hub id.

Every place that takes a model by name (neoj.load, every command's --model, neoj info, neoj quantize,
neoj merge, neoj finetune) resolves it here, so a name means the same everywhere and a bad one gets
the same one-line error. Accepted, in this order:
  - an existing directory (a local directory always wins over a name that could mean something else);
  - "builtin": the model shipped inside neoj (src/neoj/builtin). A Hub id needs owner/name, so it can
    never be "builtin"; a directory called builtin in the current directory still wins, as any local
    directory does over a Hub id of the same spelling (write ./builtin to say so explicitly);
  - "random:PRESET": random weights of a published shape (handled by neoj.load, no checkpoint);
  - a Hub id, owner/name, downloaded into (or found in) the Hugging Face cache.
Anything that looks like a path (./x, ../x, /x, ~/x, a/b/c, x/) and does not exist is "no such
directory", never sent to the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from .hub import download, hub_id_problem

BUILTIN_NAME = "builtin"
RANDOM_PREFIX = "random:"


def _presets() -> str:
    from ..config import PRESETS

    return ", ".join(PRESETS)


def model_forms() -> str:
    """Returns the sentence listing what a model argument accepts, for error messages."""
    return (f"a model is a checkpoint directory, a Hub id (owner/name, e.g. EleutherAI/gpt-neo-125m), "
            f"{BUILTIN_NAME} (the model shipped with neoj) or {RANDOM_PREFIX}PRESET (random weights; PRESET is one "
            f"of {_presets()})")


def builtin_model_dir() -> Path | None:
    """Returns the directory of the model shipped inside neoj, if this install has one."""
    path = Path(__file__).parent.parent / "builtin"  # src/neoj/builtin
    return path if (path / "config.json").exists() else None


def looks_like_path(name: str) -> bool:
    """Returns True when `name` can only be a filesystem path, never a Hub id.

    That is: it starts with ".", "~" or a separator (./x, ../x, /x, ~/x), is absolute, ends with a
    separator, or holds two separators or more (a/b/c). A Hub id is exactly owner/name.
    """
    seps = (os.sep,) + ((os.altsep,) if os.altsep else ()) + (("/",) if "/" not in (os.sep, os.altsep) else ())
    return (name.startswith((".", "~") + seps) or os.path.isabs(name) or name.endswith(seps)
            or sum(name.count(sep) for sep in seps) >= 2)


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
        from ..config import PRESETS

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
