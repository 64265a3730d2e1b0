"""Shared checks and atomic file writing for the format readers/writers.

State-dict and dtype checks, `torch.load` of untrusted files, JSON and folder checks,
and atomic file output: every error is a one-line `Llama2Error` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import Llama2Error
from .checkpoint import TensorSpec, expected_shapes, lazy

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short storage-type name ("F32", "BF16", ...) as safetensors and GGUF spell them."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.").upper())


def describe_names(names: list[str], limit: int = 5) -> str:
    """A short comma-separated list of tensor names for an error message."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def check_tensor(
    name: str, tensor: torch.Tensor, expected: Mapping[str, tuple[int, ...]], source: str, label: str | None = None
) -> None:
    """Raise `Llama2Error` unless `tensor` is a known floating-point weight of the expected shape.

    Args:
        name: canonical name.
        tensor: the weight.
        expected: canonical name -> shape (`expected_shapes`).
        source: the file, for the message.
        label: how to call the tensor in the message (defaults to `name`).
    """
    check_spec(name, TensorSpec(tuple(tensor.shape), tensor.dtype), expected, source, label)


def check_spec(
    name: str, spec: TensorSpec, expected: Mapping[str, tuple[int, ...]], source: str, label: str | None = None
) -> None:
    """`check_tensor` for a tensor known by its `TensorSpec` only (before it is read)."""
    label = label or name
    if name not in expected:
        raise Llama2Error(f"{source}: unexpected tensor {label}")
    if not spec.dtype.is_floating_point:
        raise Llama2Error(f"{source}: tensor {label} has unsupported type {dtype_name(spec.dtype)}")
    if tuple(spec.shape) != expected[name]:
        raise Llama2Error(
            f"{source}: tensor {label} has shape {list(spec.shape)} but the config implies {list(expected[name])}"
        )


def check_state_dict(state_dict: Mapping[str, torch.Tensor], args: ModelArgs, source: str) -> None:
    """Raise `Llama2Error` unless `state_dict` holds exactly the weights `args` describes.

    A `LazyStateDict` is checked by its specs, without reading any tensor.
    """
    specs = lazy(state_dict)
    expected = expected_shapes(args)
    unexpected = [name for name in specs if name not in expected]
    if unexpected:
        raise Llama2Error(f"{source}: unexpected tensor(s) {describe_names(unexpected)}")
    missing = [name for name in expected if name not in specs]
    if missing:
        raise Llama2Error(f"{source}: missing tensor(s) {describe_names(missing)}")
    for name in expected:  # canonical order, so the first mismatch reported is the most telling
        check_spec(name, specs.spec(name), expected, source)


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a `torch.save`d dict of tensors safely (`weights_only`), memory-mapped when possible.

    Raises:
        Llama2Error: the file is not a PyTorch checkpoint of named tensors.
    """
    try:
        # mmap needs the zip-based format (torch >= 1.6); older files load into memory.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch.load raises many unrelated types for foreign files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Llama2Error(f"{path}: not a readable PyTorch checkpoint ({reason})") from error
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise Llama2Error(f"{path}: expected a dict of named tensors, found {type(obj).__name__}")
    return obj


def read_json(path: Path) -> dict:
    """Parse a JSON object file, raising `Llama2Error` naming the file on any problem."""
    if not path.is_file():
        raise Llama2Error(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Llama2Error(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise Llama2Error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_dtype(dtype: torch.dtype, source: Path) -> None:
    """Raise `Llama2Error` unless `dtype` is a floating-point torch dtype."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise Llama2Error(f"{source}: dtype must be a floating-point torch dtype, got {dtype!r}")


def require_folder(folder: Path) -> None:
    """Raise `Llama2Error` unless `folder` is an existing directory."""
    if not folder.exists():
        raise Llama2Error(f"{folder}: no such directory")
    if not folder.is_dir():
        raise Llama2Error(f"{folder}: not a directory")


def read_folder_config(folder: Path, config_file: str, kind: str) -> tuple[Path, dict]:
    """Check `folder`, then read its JSON config file `config_file`.

    Args:
        folder: the model folder.
        config_file: the config file's name inside `folder` (its presence marks the format).
        kind: the format, for the message ("a Meta checkpoint", ...).

    Returns:
        The config file's path and its parsed JSON object.
    """
    require_folder(folder)
    path = folder / config_file
    if not path.is_file():
        raise Llama2Error(f"{folder}: no {config_file} (not {kind} folder)")
    return path, read_json(path)


def build_args(fields: dict, source: Path) -> ModelArgs:
    """`ModelArgs(**fields)`, with validation failures reported against `source`."""
    try:
        return ModelArgs(**fields)
    except (Llama2Error, TypeError, ValueError) as error:
        raise Llama2Error(f"{source}: {error}") from error


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` only if the block succeeds.

    Readers never see a half-written file: the rename is atomic on one file system, and
    on any exception the temporary file is removed and `path` is left untouched.
    """
    temp_name = _temp_sibling(path, "tmp")
    # Created like any new file (permissions from the umask), unlike tempfile's private 0600.
    os.close(os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield Path(temp_name)
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _temp_sibling(path: Path, suffix: str) -> Path:
    """A hidden, unique name next to `path` that no reader mistakes for a finished output."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.{suffix}")


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a new temporary folder next to `path`; put it in place of `path` only if the block succeeds.

    A killed or failed write leaves at most a hidden ``.NAME.*.tmp`` folder, never a
    partial `path`. An existing `path` (a folder) is replaced as a whole: it is moved
    aside, the new folder renamed into place, then the old one deleted.

    Raises:
        Llama2Error: `path` exists and is not a folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise Llama2Error(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(path, "tmp")
    temp.mkdir()
    try:
        yield temp
        _replace_folder(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _replace_folder(new: Path, path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.replace(new, path)
        return
    old = _temp_sibling(path, "old")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_output(path) as temp:
        temp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
