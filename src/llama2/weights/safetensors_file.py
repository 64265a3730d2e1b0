"""The safetensors format, read and written one tensor at a time with plain file I/O.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range in the data section, then the data. The reader
checks every field of the header against the file before it allocates anything, and
reads a tensor with one `readinto` (no memory map, so a converted tensor's pages do not
stay in the process); the writer takes the header up front and the tensors in order,
so that a whole shard never has to be in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from math import prod
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

from ..errors import Llama2Error
from .checkpoint import TensorSpec
from .common import dtype_name

# safetensors dtype names -> torch dtypes (the ones torch has).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
METADATA_KEY = "__metadata__"
_LENGTH_BYTES = 8
_ALIGNMENT = 8  # the header is padded with spaces so the data starts 8-byte aligned


class _Entry(NamedTuple):
    spec: TensorSpec
    start: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """A safetensors file whose header has been checked against the file's size.

    Args:
        path: the file.

    Raises:
        Llama2Error: the file is missing, truncated, or its header is malformed or
            points outside the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with self.path.open("rb") as file:
                size = os.fstat(file.fileno()).st_size
                header = _read_header(file, size, self.path)
        except FileNotFoundError:
            raise Llama2Error(f"{self.path}: no such file") from None
        except OSError as error:
            raise Llama2Error(f"{self.path}: cannot read ({error.strerror or error})") from None
        self.metadata, self._entries = _parse_header(header, size, self.path)

    def names(self) -> list[str]:
        """Tensor names, in the order of their data in the file."""
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        """Shape and torch dtype of tensor `name`."""
        return self._entries[name].spec

    def dtype(self, name: str) -> str:
        """safetensors' name of tensor `name`'s dtype ("BF16", ...)."""
        return _NAMES[self.spec(name).dtype]

    def load(self, name: str) -> torch.Tensor:
        """Read tensor `name` into a new CPU tensor.

        Raises:
            Llama2Error: the file became shorter than its header says.
        """
        spec, start, end = self._entries[name]
        if end == start:
            return torch.empty(spec.shape, dtype=spec.dtype)
        buffer = np.empty(end - start, dtype=np.uint8)
        with self.path.open("rb") as file:
            file.seek(start)
            got = file.readinto(memoryview(buffer))
        if got != end - start:
            raise Llama2Error(f"{self.path}: truncated safetensors file (tensor {name} is cut short)")
        return torch.from_numpy(buffer).view(spec.dtype).reshape(spec.shape)


def _corrupt(path: Path, reason: str) -> Llama2Error:
    return Llama2Error(f"{path}: corrupt safetensors file ({reason})")


def _read_header(file: BinaryIO, size: int, path: Path) -> bytes:
    prefix = file.read(_LENGTH_BYTES)
    if len(prefix) < _LENGTH_BYTES:
        raise Llama2Error(f"{path}: truncated safetensors file ({size} bytes)")
    length = int.from_bytes(prefix, "little")
    if length > size - _LENGTH_BYTES:
        raise _corrupt(path, f"header length {length} exceeds file size {size}")
    return file.read(length)


def _parse_header(header: bytes, size: int, path: Path) -> tuple[dict[str, str], dict[str, _Entry]]:
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _corrupt(path, f"header is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = parsed.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, f"{METADATA_KEY} must map names to strings")
    data_start = _LENGTH_BYTES + len(header)
    entries = {name: _entry(name, info, data_start, size, path) for name, info in parsed.items()}
    ordered = dict(sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)))
    _check_no_overlap(ordered, path)
    return metadata, ordered


def _entry(name: str, info: object, data_start: int, size: int, path: Path) -> _Entry:
    if not isinstance(info, dict):
        raise _corrupt(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not _int_list(shape) or len(shape) > 8:
        raise _corrupt(path, f"tensor {name!r} has invalid shape {shape!r}")
    if not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise _corrupt(path, f"tensor {name!r} data (bytes {start}..{end}) runs past the end of the file ({size})")
    nbytes = prod(shape) * DTYPES[dtype].itemsize
    if end - start != nbytes:
        span = end - start
        raise _corrupt(path, f"tensor {name!r} of {dtype} {shape} needs {nbytes} bytes, its data_offsets span {span}")
    return _Entry(TensorSpec(tuple(shape), DTYPES[dtype]), start, end)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def _check_no_overlap(ordered: dict[str, _Entry], path: Path) -> None:
    previous_end, previous = 0, None
    for name, entry in ordered.items():
        if entry.start < previous_end and entry.end > entry.start:
            raise _corrupt(path, f"tensors {previous!r} and {name!r} overlap")
        if entry.end > entry.start:
            previous_end, previous = entry.end, name


# ---------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------


def header_bytes(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """Length prefix and padded JSON header for tensors laid out in the order of `specs`."""
    header: dict[str, object] = {METADATA_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in _NAMES:
            raise Llama2Error(f"tensor {name}: dtype {dtype_name(spec.dtype)} cannot be stored in safetensors")
        nbytes = prod(spec.shape) * spec.dtype.itemsize
        entry = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
        header[name] = entry
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + _LENGTH_BYTES) % _ALIGNMENT)
    return len(text).to_bytes(_LENGTH_BYTES, "little") + text


def data_size(specs: Mapping[str, TensorSpec]) -> int:
    """Bytes of tensor data a file with `specs` holds."""
    return sum(prod(spec.shape) * spec.dtype.itemsize for spec in specs.values())


class SafetensorsWriter:
    """Write one safetensors file whose tensors arrive one at a time, in the order of `specs` (a context manager).

    Args:
        path: the file to create (the caller makes it atomic).
        specs: name -> `TensorSpec`, in file order.
        metadata: the header's ``__metadata__`` strings.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = path
        self._pending = list(specs.items())
        self._file = path.open("wb")
        self._file.write(header_bytes(specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor `name`, which must be the next one of `specs`, with its shape and dtype."""
        if not self._pending:
            raise Llama2Error(f"{self.path}: tensor {name} was not announced")
        expected, spec = self._pending.pop(0)
        if name != expected or (tuple(tensor.shape), tensor.dtype) != spec:
            got = f"{name} {list(tensor.shape)} {tensor.dtype}"
            raise Llama2Error(f"{self.path}: got tensor {got}, expected {expected} {spec}")
        write_tensor_bytes(self._file, tensor)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Close the file; when the block succeeded, every announced tensor must have been written."""
        self._file.close()
        if error is None and self._pending:
            raise Llama2Error(f"{self.path}: tensor {self._pending[0][0]} was never written")


def write_tensor_bytes(file: BinaryIO, tensor: torch.Tensor) -> None:
    """Write `tensor`'s bytes (C order, native little-endian) to `file`."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    file.write(memoryview(flat.view(torch.uint8).numpy()))
