"""Convert a checkpoint to another format, streaming one tensor at a time.

    convert("Llama-2-7b-chat-hf", "llama-2-7b-chat.Q4_0.gguf", "gguf", tensor_type="q4_0")

The source is opened lazily (`open_checkpoint`), its tokenizer found and handed to the
writer, and each tensor is read, converted and written before the next is read, so a
conversion needs about one tensor's memory beyond the source. Every writer builds its
output under a temporary name and renames it into place only when it is complete.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from gguf.constants import Keys

from ..errors import Llama2Error, Llama2Warning
from ..tokenizer import Tokenizer
from . import open_checkpoint
from .checkpoint import Checkpoint, LazyStateDict
from .gguf_writer import TYPE_CHOICES, write_gguf
from .hf import DEFAULT_MAX_SHARD_BYTES, write_hf
from .inspect import find_tokenizer
from .meta import write_meta

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""`--dtype` names; "auto" keeps each tensor's dtype (dequantized GGUF tensors are float32)."""


def _to_meta(checkpoint: Checkpoint, tensors: LazyStateDict, dest: Path, tokenizer: Tokenizer | None, options: dict):
    return write_meta(
        checkpoint.args,
        tensors,
        dest,
        options.get("num_shards") or 1,
        tokenizer=tokenizer,
        chat_template=checkpoint.chat_template,
    )


def _to_hf(checkpoint: Checkpoint, tensors: LazyStateDict, dest: Path, tokenizer: Tokenizer | None, options: dict):
    return write_hf(
        checkpoint.args,
        tensors,
        dest,
        tokenizer=tokenizer,
        chat_template=checkpoint.chat_template,
        max_shard_bytes=options.get("max_shard_bytes") or DEFAULT_MAX_SHARD_BYTES,
    )


def _to_gguf(checkpoint: Checkpoint, tensors: LazyStateDict, dest: Path, tokenizer: Tokenizer | None, options: dict):
    # A GGUF source's own tokenizer keys are copied exactly, unless another tokenizer was asked for.
    keep = checkpoint.tokenizer_metadata if options.get("tokenizer_path") is None else None
    name = checkpoint.metadata.get(Keys.General.NAME) or Path(checkpoint.source).stem
    return write_gguf(
        checkpoint.args,
        tensors,
        dest,
        tensor_type=options.get("tensor_type") or "auto",
        tokenizer=tokenizer,
        tokenizer_metadata=keep,
        chat_template=checkpoint.chat_template,
        name=str(name),
    )


Writer = Callable[[Checkpoint, LazyStateDict, Path, "Tokenizer | None", dict], Path]

WRITERS: dict[str, Writer] = {"meta": _to_meta, "hf": _to_hf, "gguf": _to_gguf}
"""Output format name -> writer."""

# Options that apply to one output format only.
_FORMAT_OPTIONS = {"num_shards": "meta", "max_shard_bytes": "hf", "tensor_type": "gguf"}


def convert(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    to: str,
    *,
    num_shards: int | None = None,
    tensor_type: str | None = None,
    max_shard_bytes: int | None = None,
    dtype: str = "auto",
    tokenizer_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Convert checkpoint `source` into format `to` at `dest`.

    Args:
        source: anything `load_checkpoint` accepts (model name, GGUF file, HF or Meta folder).
        dest: the output: a folder for "meta" and "hf", a file for "gguf".
        to: "meta", "hf" or "gguf".
        num_shards: Meta model-parallel shards (1, 2, 8 as Llama 2 7B/13B/70B ship).
        tensor_type: GGUF tensor type or mix, one of `gguf_writer.TYPE_CHOICES`.
        max_shard_bytes: Hugging Face safetensors shard size limit.
        dtype: a key of `DTYPES`: cast float weights (Meta and HF outputs).
        tokenizer_path: a tokenizer to ship instead of the source's own.
        overwrite: replace an existing `dest`.
        progress: show a progress bar over tensors on stderr.

    Returns:
        The output path.

    Raises:
        Llama2Error: a broken source, an impossible conversion, an option for another
            format, or an existing `dest` without `overwrite`.
    """
    options = _check_options(to, dtype, num_shards=num_shards, tensor_type=tensor_type, max_shard_bytes=max_shard_bytes)
    options["tokenizer_path"] = tokenizer_path
    checkpoint = open_checkpoint(source)
    dest = Path(dest)
    _check_destination(dest, Path(checkpoint.source), overwrite)
    tokenizer = find_tokenizer(checkpoint, tokenizer_path)
    if tokenizer is None:
        warnings.warn(
            f"{checkpoint.source}: no tokenizer found next to the checkpoint; writing the weights without one "
            "(pass --tokenizer)",
            Llama2Warning,
            stacklevel=2,
        )
    tensors = _cast(checkpoint.state_dict, DTYPES[dtype])
    with _progress_bar(len(tensors), progress) as advance:
        return WRITERS[to](checkpoint, tensors.map(advance), dest, tokenizer, options)


def _check_options(to: str, dtype: str, **options) -> dict:
    if to not in WRITERS:
        raise Llama2Error(f"unknown output format {to!r} (choose from {', '.join(WRITERS)})")
    if dtype not in DTYPES:
        raise Llama2Error(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    for option, value in options.items():
        if value is not None and _FORMAT_OPTIONS[option] != to:
            raise Llama2Error(f"{option} applies to {_FORMAT_OPTIONS[option]} output only, not {to}")
    if options["tensor_type"] is not None and options["tensor_type"] not in TYPE_CHOICES:
        choices = ", ".join(TYPE_CHOICES)
        raise Llama2Error(f"unknown GGUF tensor type {options['tensor_type']!r} (choose from {choices})")
    return options


def _check_destination(dest: Path, source: Path, overwrite: bool) -> None:
    if dest.resolve() == source.resolve() or dest.resolve() in source.resolve().parents:
        raise Llama2Error(f"{dest}: the destination would replace the source")
    if dest.exists() and not overwrite and not (dest.is_dir() and not any(dest.iterdir())):
        raise Llama2Error(f"{dest}: already exists (pass --force to replace it)")


def _cast(tensors: LazyStateDict, dtype: torch.dtype | None) -> LazyStateDict:
    if dtype is None:
        return tensors
    return tensors.map(lambda name, tensor: tensor.to(dtype), dtype=dtype)


@contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[str, torch.Tensor], torch.Tensor]]:
    """Yield a pass-through `LazyStateDict.map` function that advances a tqdm bar per tensor read."""
    from tqdm import tqdm

    with tqdm(total=total, unit="tensor", desc="Converting", disable=not enabled, leave=False) as bar:

        def advance(name: str, tensor: torch.Tensor) -> torch.Tensor:
            bar.set_postfix_str(name, refresh=False)
            bar.update(1)
            return tensor

        yield advance
