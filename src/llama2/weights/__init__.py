"""Checkpoint readers and writers, and `load_checkpoint`, which picks the reader for a source.

Every reader returns a `Checkpoint` in the canonical (Meta) naming and RoPE layout;
nothing outside this package knows a file format exists. `open_checkpoint` returns one
whose tensors are read lazily, for streaming conversions (`llama2.weights.convert`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import Llama2Error
from . import hub, registry
from .checkpoint import Checkpoint, LazyStateDict
from .gguf import open_gguf, read_gguf
from .gguf_header import MAGIC as GGUF_MAGIC
from .gguf_writer import write_gguf
from .hf import open_hf, read_hf, write_hf
from .meta import open_meta, read_meta, write_meta

__all__ = [
    "Checkpoint",
    "LazyStateDict",
    "detect_format",
    "load_checkpoint",
    "open_checkpoint",
    "open_gguf",
    "open_hf",
    "open_meta",
    "read_gguf",
    "read_hf",
    "read_meta",
    "write_gguf",
    "write_hf",
    "write_meta",
]

Reader = Callable[..., Checkpoint]


def _gguf_file(path: Path) -> Path | None:
    """`path` itself when it is a file starting with the GGUF magic."""
    if not path.is_file():
        return None
    with path.open("rb") as file:
        return path if file.read(len(GGUF_MAGIC)) == GGUF_MAGIC else None


def _folder_with(name: str) -> Callable[[Path], Path | None]:
    """Detector for a folder holding the file `name`."""
    return lambda path: path if (path / name).is_file() else None


def _single_gguf_in_folder(path: Path) -> Path | None:
    """The one `.gguf` file inside folder `path`, if there is exactly one."""
    if not path.is_dir():
        return None
    found = [child for child in path.iterdir() if child.suffix == ".gguf" and child.is_file()]
    return found[0] if len(found) == 1 else None


# (format, detector returning the path to hand the reader or None, reader), tried in order.
FORMATS: tuple[tuple[str, Callable[[Path], Path | None], Reader], ...] = (
    ("gguf", _gguf_file, read_gguf),
    ("hf", _folder_with("config.json"), read_hf),
    ("meta", _folder_with("params.json"), read_meta),
    ("gguf", _single_gguf_in_folder, read_gguf),
)


# Format name -> function opening it lazily.
OPENERS: dict[str, Callable[[Path], Checkpoint]] = {"gguf": open_gguf, "hf": open_hf, "meta": open_meta}


def detect_format(source: str | os.PathLike) -> tuple[str, Path, Reader]:
    """Which reader handles `source`: (format name, path to read, reader function).

    A registry model name resolves (downloading if needed) to its cached GGUF file; a
    Hugging Face repo id (``org/name``) to the folder `llama2 pull` put it in.

    Raises:
        Llama2Error: the source does not exist or is no recognised checkpoint.
    """
    if isinstance(source, str) and source in registry.MODELS:
        return "gguf", registry.resolve(source), read_gguf
    path = Path(source)
    if not path.exists() and isinstance(source, str) and hub.is_repo_id(source):
        path = hub.resolve(source)
    if not path.exists():
        known = ", ".join(registry.model_names())
        raise Llama2Error(f"{source}: no such file or directory (known model names: {known})")
    for name, detector, reader in FORMATS:
        found = detector(path)
        if found is not None:
            return name, found, reader
    raise Llama2Error(f"{source}: not a model name, GGUF file, Hugging Face folder or Meta checkpoint folder")


def load_checkpoint(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> Checkpoint:
    """Load a checkpoint from a model name, a GGUF file or a model folder.

    Args:
        source: a registry name (e.g. ``"smollm2-135m-instruct"``), a GGUF file (recognised
            by its magic bytes), a Hugging Face folder (`config.json`), a Meta folder
            (`params.json`), or a folder holding exactly one `.gguf` file.
        dtype: floating-point type of the returned weights.
        device: device of the returned weights.

    Raises:
        Llama2Error: the source is missing, unrecognised or broken.
    """
    _, path, reader = detect_format(source)
    return reader(path, dtype=dtype, device=device)


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Open any source `load_checkpoint` accepts lazily: tensors are read one at a time when looked up.

    The returned `Checkpoint.state_dict` is a `LazyStateDict` in the source's own dtypes
    (dequantized GGUF tensors as float32); everything else is checked up front.

    Raises:
        Llama2Error: the source is missing, unrecognised or broken.
    """
    fmt, path, _ = detect_format(source)
    return OPENERS[fmt](path)
