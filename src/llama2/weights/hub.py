"""Models on the Hugging Face Hub: `pull` downloads only the files a checkpoint needs.

Files come through `huggingface_hub` (which reads the token from ``HF_TOKEN`` or its
login, resumes interrupted downloads, and moves each file into place only when it is
complete) into ``$LLAMA2_HOME/hub/ORG/NAME``, a plain model folder every reader
accepts; afterwards the repo id itself works as a model source. This is the only module
that talks to the Hub, and only `pull` needs the network.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import Llama2Error
from .registry import models_home

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

CONFIG_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "params.json",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
)
"""Small files a checkpoint folder may need next to its weights."""

WEIGHT_LAYOUTS = (
    ("safetensors", re.compile(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")),
    ("PyTorch", re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")),
    ("Meta", re.compile(r"consolidated\.\d+\.pth")),
)
"""Weight file sets, in order of preference: the first a repository has is downloaded."""


def is_repo_id(text: str) -> bool:
    """Whether `text` has the form of a Hub repo id, ``org/name``."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def local_folder(repo_id: str) -> Path:
    """Where `pull` puts repo `repo_id`: ``$LLAMA2_HOME/hub/ORG/NAME``."""
    org, name = repo_id.split("/")
    return models_home() / "hub" / org / name


def resolve(repo_id: str) -> Path:
    """The folder of an already pulled repo.

    Raises:
        Llama2Error: it has not been pulled.
    """
    folder = local_folder(repo_id)
    if not folder.is_dir():
        raise Llama2Error(
            f"{repo_id}: no such file or directory, and no Hugging Face model of that name has been pulled "
            f"(run: llama2 pull {repo_id})"
        )
    return folder


def select_files(repo_id: str, files: list[str], filename: str | None = None) -> list[str]:
    """The files of a repository to download: one weight layout (`WEIGHT_LAYOUTS`) and `CONFIG_FILES`.

    Args:
        repo_id: the repository, for messages.
        files: every file in it.
        filename: one file wanted instead (a ``.gguf`` among many).

    Raises:
        Llama2Error: `filename` is not in the repository, or it holds no weights this
            library reads (GGUF-only repositories need `filename`).
    """
    if filename is not None:
        if filename not in files:
            raise Llama2Error(f"{repo_id}: has no file {filename}")
        return [filename]
    top_level = [name for name in files if "/" not in name]
    for _, pattern in WEIGHT_LAYOUTS:
        weights = [name for name in top_level if pattern.fullmatch(name)]
        if weights:
            return sorted(weights + [name for name in top_level if name in CONFIG_FILES])
    ggufs = sorted(name for name in files if name.endswith(".gguf"))
    if ggufs:
        raise Llama2Error(f"{repo_id}: holds GGUF files only; pick one with --file (e.g. --file {ggufs[0]})")
    raise Llama2Error(f"{repo_id}: no safetensors, PyTorch or Meta weights in the repository")


def pull(repo_id: str, *, revision: str | None = None, filename: str | None = None) -> Path:
    """Download the files of Hub repository `repo_id` that `select_files` picks.

    Re-running a pull resumes it and skips files already complete.

    Args:
        repo_id: ``org/name``.
        revision: a branch, tag or commit (default: the main branch).
        filename: download this one file (e.g. a ``.gguf``) instead.

    Returns:
        The local folder (or, with `filename`, the file).

    Raises:
        Llama2Error: a malformed id, a missing or gated repository, no network.
    """
    if not is_repo_id(repo_id):
        raise Llama2Error(f"{repo_id!r} is not a Hugging Face repo id (expected ORG/NAME)")
    folder = local_folder(repo_id)
    wanted = select_files(repo_id, _list_files(repo_id, revision), filename)
    _download(repo_id, revision, wanted, folder)
    return folder / filename if filename else folder


def _list_files(repo_id: str, revision: str | None) -> list[str]:
    """Every file path in the repository (network)."""
    import huggingface_hub

    with _hub_errors(repo_id):
        return huggingface_hub.list_repo_files(repo_id, revision=revision)


def _download(repo_id: str, revision: str | None, files: list[str], folder: Path) -> None:
    """Download `files` of the repository into `folder` (network; resumable)."""
    import huggingface_hub

    with _hub_errors(repo_id):
        huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=files, local_dir=folder)


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """Turn `huggingface_hub` and network failures into one-line `Llama2Error`s naming the repo."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        yield
    except Llama2Error:
        raise
    except Exception as error:  # huggingface_hub and its HTTP client raise many types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if isinstance(error, GatedRepoError):
            hint = "; it is gated: accept its license on huggingface.co and set HF_TOKEN"
        elif isinstance(error, RepositoryNotFoundError):
            hint = "; check the name, or set HF_TOKEN for a private repository"
        else:
            hint = "; check the network connection and retry (downloads resume)"
        raise Llama2Error(f"{repo_id}: download failed ({first_line}){hint}") from error
