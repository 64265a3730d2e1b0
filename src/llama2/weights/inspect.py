"""Find a checkpoint's tokenizer without loading its weights, and describe a checkpoint."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from gguf.constants import Keys

from ..chat import resolve_chat_format
from ..config import describe_args
from ..errors import Llama2Error
from ..tokenizer import Tokenizer
from . import detect_format, load_checkpoint
from .checkpoint import Checkpoint
from .tokenizer_files import find_tokenizer_file


def _tokenizer_beside(folder: Path) -> Path | None:
    """The folder itself or its parent when it holds a tokenizer file (Meta puts it one level up)."""
    found = find_tokenizer_file(folder, folder.parent)
    return None if found is None else found.parent


def load_tokenizer(source: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint, read without its weights.

    Args:
        source: anything `load_checkpoint` accepts.
        tokenizer_path: a tokenizer to use instead (file or folder); wins when given.
    """
    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path)
    fmt, path, _ = detect_format(source)
    if fmt == "gguf":
        return Tokenizer.from_file(path)
    found = _tokenizer_beside(path)
    if found is None:
        raise Llama2Error(
            f"{source}: no tokenizer.model or tokenizer.json next to the checkpoint; pass --tokenizer PATH"
        )
    return Tokenizer.from_file(found)


def checkpoint_tokenizer(checkpoint: Checkpoint, tokenizer_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of an already loaded checkpoint (GGUF files carry theirs inside).

    Raises:
        Llama2Error: there is none (see `find_tokenizer`) or it is broken.
    """
    tokenizer = find_tokenizer(checkpoint, tokenizer_path)
    if tokenizer is None:
        raise Llama2Error(
            f"{checkpoint.source}: no tokenizer.model or tokenizer.json next to the checkpoint; pass --tokenizer PATH"
        )
    return tokenizer


def find_tokenizer(checkpoint: Checkpoint, tokenizer_path: str | os.PathLike | None = None) -> Tokenizer | None:
    """The checkpoint's tokenizer: `tokenizer_path` if given, else its GGUF metadata, else the
    tokenizer file next to it (or one folder up, where Meta puts it); None when there is none.
    """
    if tokenizer_path is not None:
        return Tokenizer.from_file(tokenizer_path)
    if checkpoint.tokenizer_metadata:
        return Tokenizer.from_gguf_metadata(checkpoint.tokenizer_metadata, source=checkpoint.source)
    path = Path(checkpoint.source)
    found = _tokenizer_beside(path if path.is_dir() else path.parent)
    return Tokenizer.from_file(found) if found is not None else None


def describe(source: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> dict[str, str]:
    """Lines for `llama2 info`: format, architecture, tensor types, tokenizer and chat format."""
    checkpoint = load_checkpoint(source, dtype=torch.bfloat16)
    tokenizer = checkpoint_tokenizer(checkpoint, tokenizer_path)
    types = Counter(checkpoint.tensor_types.values())
    try:
        chat_format = resolve_chat_format(tokenizer, checkpoint.chat_template or tokenizer.chat_template).name
    except Llama2Error:
        chat_format = "none (completion only; pass --chat-format)"
    name = checkpoint.metadata.get(Keys.General.NAME)
    return {
        "source": checkpoint.source,
        "format": checkpoint.format + (f" ({name})" if name else ""),
        **describe_args(checkpoint.args),
        "tensor types": ", ".join(f"{t} x{n}" for t, n in types.most_common()),
        "tokenizer": f"{type(tokenizer).__name__}, {tokenizer.n_words} tokens, "
        f"bos {tokenizer.bos_token!r} eos {tokenizer.eos_token!r}",
        "stop tokens": ", ".join(repr(tokenizer.id_to_piece(i)) for i in sorted(tokenizer.stop_ids)),
        "chat format": chat_format,
    }
