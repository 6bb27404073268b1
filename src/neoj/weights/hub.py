"""The Hugging Face Hub: valid Hub ids, and downloading a checkpoint into (or finding it in) the HF cache.

Only what a model directory needs is fetched: the side files and one weight format. Every failure,
from a mistyped id to a machine with no network, becomes one CheckpointError that says what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .files import SIDE_FILES
from ..errors import CheckpointError

log = logging.getLogger(__name__)


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
    from huggingface_hub import constants, snapshot_download

    problem = hub_id_problem(repo_id)
    if problem is not None:
        raise CheckpointError(f"{repo_id!r} is not a valid Hub id ({problem}); a Hub id is owner/name, such as "
                              "EleutherAI/gpt-neo-125m")
    offline = bool(constants.HF_HUB_OFFLINE)
    unreachable: str | None = None  # why the Hub could not be asked, when it could not
    try:
        files, unreachable = (None, None) if offline else _list_repo(repo_id, revision)
        if patterns is None:
            patterns = SIDE_FILES + (_pick_weight_patterns(files) if files is not None
                                     else ["*.safetensors", "*.bin", "*.index.json"])
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                  local_files_only=offline or unreachable is not None,
                                  tqdm_class=None if progress else _NoProgress)
    except Exception as exc:
        raise _download_error(exc, repo_id, revision, offline, unreachable) or exc
    if unreachable is not None:
        log.warning("cannot reach the Hugging Face Hub (%s): using the cached copy of %s; set HF_HUB_OFFLINE=1 "
                    "to skip the check", unreachable, repo_id)
    return Path(local)


def _list_repo(repo_id: str, revision: str | None) -> tuple[list[str] | None, str | None]:
    """Asks the Hub, once, for the repo's files; returns (files, None), or (None, why it could not be asked).

    A repo or revision that does not exist raises: the cache cannot help with those.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return [s.rfilename for s in info.siblings or []], None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except HfHubHTTPError as exc:  # the Hub answered, with an error (5xx, 401...): try the cache
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return None, f"it answered HTTP {status}" if status else _reason(exc)
    except _network_errors() as exc:
        return None, _reason(exc)


def _download_error(exc: Exception, repo_id: str, revision: str | None, offline: bool,
                    unreachable: str | None) -> CheckpointError | None:
    """Returns the CheckpointError that explains a failed download, or None for an error it does not know."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is one
        error = CheckpointError(f"{repo_id!r} is gated on the Hugging Face Hub: accept its terms on "
                                f"https://huggingface.co/{repo_id} and set HF_TOKEN")
    elif isinstance(exc, RepositoryNotFoundError):
        error = CheckpointError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private: set HF_TOKEN)")
    elif isinstance(exc, RevisionNotFoundError):
        error = CheckpointError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face Hub")
    elif isinstance(exc, LocalEntryNotFoundError):
        error = _not_in_cache(exc, repo_id, offline, unreachable)
    elif isinstance(exc, HFValidationError):
        error = CheckpointError(f"invalid Hub id or revision for {repo_id!r}: {_reason(exc)}")
    elif isinstance(exc, HfHubHTTPError):
        error = CheckpointError(f"downloading {repo_id!r} failed: {_reason(exc)}")
    elif isinstance(exc, _network_errors()):
        error = CheckpointError(f"downloading {repo_id!r} failed: the connection to {constants.ENDPOINT} broke "
                                f"({_reason(exc)}); run the command again to resume")
    else:
        return None
    error.__cause__ = exc
    return error


def _not_in_cache(exc: Exception, repo_id: str, offline: bool, unreachable: str | None) -> CheckpointError:
    """Returns the error for a model that had to come from the cache and is not (completely) there."""
    from huggingface_hub import constants

    if type(exc).__name__ == "IncompleteSnapshotError":
        return CheckpointError(f"the cached copy of {repo_id!r} is incomplete (an interrupted download?) and the "
                               f"Hub cannot be reached; run `neoj download {repo_id}` with a network")
    if offline:
        return CheckpointError(
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; run `neoj download "
            f"{repo_id}` where there is a network (or unset HF_HUB_OFFLINE), or pass a local directory"
        )
    return CheckpointError(
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({unreachable}) and {repo_id!r} is not in the "
        f"local Hugging Face cache; " + _offline_help(repo_id)
    )


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
