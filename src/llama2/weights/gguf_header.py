"""The bounds-checked reader of a GGUF file's header: its metadata and tensor table.

`HeaderReader` checks every length and count against the file size before it reads a
value (a corrupted count cannot make it loop for ever or read past the file) and keeps
only plain Python values: `gguf.GGUFReader` would build a numpy view per array element,
~160 MB for a 49k-token vocabulary. `read_gguf_metadata` gives the metadata alone (what
the tokenizer needs); `llama2.weights.gguf` reads the tensors the table points at.
"""

from __future__ import annotations

import mmap
import os
import struct
from math import prod
from typing import Any, NamedTuple

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from ..errors import Llama2Error

__all__ = ["MAGIC", "HeaderReader", "TensorInfo", "read_gguf_metadata", "read_header"]

V = GGUFValueType

MAGIC = GGUF_MAGIC.to_bytes(4, "little")
"""The four bytes a GGUF file starts with (``b"GGUF"``)."""


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value fields of a GGUF file as plain python values.

    Includes the reader's pseudo-fields ``GGUF.version``, ``GGUF.tensor_count`` and
    ``GGUF.kv_count``. Scalar float32 values are given as the shortest decimal that
    round-trips (``1e-05`` rather than ``9.999999747378752e-06``).

    Raises:
        Llama2Error: the file is missing or is not a valid GGUF file.
    """
    source = os.fspath(path)
    return read_header(source)[0]


def _invalid(path: str, reason: str) -> Llama2Error:
    return Llama2Error(f"{path}: not a valid GGUF file ({reason})")


def read_header(path: str) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The file's metadata (plain Python values, with the pseudo-fields ``GGUF.version``,
    ``GGUF.tensor_count``, ``GGUF.kv_count`` first) and its tensor table.

    Raises:
        Llama2Error: the file is missing, unreadable or not a valid GGUF file.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise _invalid(path, "the file is empty")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return HeaderReader(buf, path).run()
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Llama2Error(f"{path}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise Llama2Error(f"{path}: cannot read ({exc.strerror or exc})") from None


# Little-endian numpy dtypes of the scalar value types.
_SCALAR_DTYPES = {
    V.UINT8: np.dtype("<u1"),
    V.INT8: np.dtype("<i1"),
    V.BOOL: np.dtype("?"),
    V.UINT16: np.dtype("<u2"),
    V.INT16: np.dtype("<i2"),
    V.UINT32: np.dtype("<u4"),
    V.INT32: np.dtype("<i4"),
    V.FLOAT32: np.dtype("<f4"),
    V.UINT64: np.dtype("<u8"),
    V.INT64: np.dtype("<i8"),
    V.FLOAT64: np.dtype("<f8"),
}
_SCALAR_BYTES = {vtype: dtype.itemsize for vtype, dtype in _SCALAR_DTYPES.items()}
# Fewest bytes one value of each type can take (a string's length, an array's type + count).
_MIN_VALUE_BYTES = {**_SCALAR_BYTES, V.STRING: 8, V.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 8
_VERSIONS = (2, 3)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class TensorInfo(NamedTuple):
    """One entry of the tensor table, with where its bytes lie in the file."""

    name: str
    dims: list[int]  # GGUF order: row length first
    qtype: GGMLQuantizationType
    offset: int  # from the start of the data section
    data_offset: int = 0  # from the start of the file (set once the header's end is known)
    n_bytes: int = 0


class HeaderReader:
    """One pass over a GGUF header that reads its values, checking every length and count against the file first."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf = buf
        self.path = path
        self.size = len(buf)
        self.pos = 0
        self.alignment = GGUF_DEFAULT_ALIGNMENT

    def run(self) -> tuple[dict[str, Any], list[TensorInfo]]:
        version, tensor_count, kv_count = self._preamble()
        meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count}
        for i in range(kv_count):
            key, value = self._key_value(i)
            meta[key] = value
        infos = [self._tensor_info(i) for i in range(tensor_count)]
        data_start = -(-self.pos // self.alignment) * self.alignment
        return meta, [self._check_tensor_data(info, data_start) for info in infos]

    def _fail(self, reason: str) -> Llama2Error:
        return _invalid(self.path, reason)

    def _preamble(self) -> tuple[int, int, int]:
        magic = bytes(self.buf[: len(MAGIC)])
        if magic != MAGIC:
            raise self._fail(f"it starts with {magic!r}, not the magic {MAGIC!r}")
        self.pos = len(MAGIC)
        version = self._u32("the version")
        if version and not version & 0xFFFF:
            raise self._fail("big-endian GGUF files are not supported")
        if version not in _VERSIONS:
            raise self._fail(f"GGUF version {version} is not supported, only {_VERSIONS}")
        tensor_count = self._count("the tensor count", _MIN_TENSOR_INFO_BYTES)
        kv_count = self._count("the metadata key count", _MIN_KV_BYTES)
        return version, tensor_count, kv_count

    def _take(self, n: int, what: str) -> int:
        """Step over `n` bytes and return where they start."""
        start = self.pos
        if n > self.size - start:
            raise self._fail(f"{what} at byte {start} runs past the end of the file ({self.size} bytes)")
        self.pos = start + n
        return start

    def _u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self._take(4, what))[0]

    def _u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self._take(8, what))[0]

    def _count(self, what: str, min_item_bytes: int) -> int:
        """Read a u64 count of items that each take at least `min_item_bytes`."""
        count = self._u64(what)
        if count * min_item_bytes > self.size - self.pos:
            raise self._fail(f"{what} {count} is more than the {self.size - self.pos} bytes left can hold")
        return count

    def _string(self, what: str) -> str:
        start = self._take(self._u64(f"the length of {what}"), what)
        try:
            return str(self.buf[start : self.pos], encoding="utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} at byte {start} is not valid UTF-8") from None

    def _value_type(self, what: str) -> GGUFValueType:
        raw = self._u32(f"the type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._fail(f"{what} has unknown value type {raw}") from None

    def _key_value(self, index: int) -> tuple[str, Any]:
        key = self._string(f"metadata key #{index}")
        what = f"metadata {key!r}"
        vtype = self._value_type(what)
        if key == Keys.General.ALIGNMENT:
            return key, self._alignment(vtype)
        value = self._value(vtype, what, depth=0)
        if vtype == V.FLOAT32:
            value = float(str(np.float32(value)))  # shortest decimal that round-trips float32
        return key, value

    def _alignment(self, vtype: GGUFValueType) -> int:
        if vtype != V.UINT32:
            raise self._fail(f"{Keys.General.ALIGNMENT} must be a uint32, not {vtype.name}")
        value = self._u32(Keys.General.ALIGNMENT)
        if value == 0 or value & (value - 1):
            raise self._fail(f"{Keys.General.ALIGNMENT} {value} is not a power of two")
        self.alignment = value
        return value

    def _value(self, vtype: GGUFValueType, what: str, depth: int) -> Any:
        if vtype in _SCALAR_DTYPES:
            return np.frombuffer(self.buf, _SCALAR_DTYPES[vtype], 1, self._take(_SCALAR_BYTES[vtype], what))[0].item()
        if vtype == V.STRING:
            return self._string(what)
        return self._array(what, depth)

    def _array(self, what: str, depth: int) -> list:
        if depth >= _MAX_ARRAY_DEPTH:
            raise self._fail(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        itype = self._value_type(f"the elements of {what}")
        count = self._count(f"the element count of {what}", _MIN_VALUE_BYTES[itype])
        if itype in _SCALAR_DTYPES:
            start = self._take(count * _SCALAR_BYTES[itype], what)
            return np.frombuffer(self.buf, _SCALAR_DTYPES[itype], count, start).tolist()
        return [self._value(itype, what, depth + 1) for _ in range(count)]

    def _tensor_info(self, index: int) -> TensorInfo:
        name = self._string(f"tensor name #{index}")
        n_dims = self._u32(f"the dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise self._fail(f"tensor {name!r} has {n_dims} dimensions, more than {_MAX_DIMS}")
        dims = [self._u64(f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
        raw_type = self._u32(f"the type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self._fail(f"tensor {name!r} has unknown GGML type {raw_type}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise self._fail(f"tensor {name!r} has GGML type {qtype.name} of unknown size")
        offset = self._u64(f"the data offset of tensor {name!r}")
        return TensorInfo(name, dims, qtype, offset)

    def _check_tensor_data(self, info: TensorInfo, data_start: int) -> TensorInfo:
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        if info.dims and info.dims[0] % block_size:
            raise self._fail(
                f"tensor {info.name!r} has rows of {info.dims[0]} values, "
                f"not a multiple of the {info.qtype.name} block size {block_size}"
            )
        if info.offset % self.alignment:
            raise self._fail(f"tensor {info.name!r} data offset {info.offset} is not aligned to {self.alignment}")
        start = data_start + info.offset
        end = start + prod(info.dims) // block_size * type_size
        if end > self.size:
            raise self._fail(
                f"tensor {info.name!r} data (bytes {start}..{end}) runs past the end of the file ({self.size} bytes)"
            )
        return info._replace(data_offset=start, n_bytes=end - start)
