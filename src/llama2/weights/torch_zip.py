"""Write a `torch.save` file of named tensors one tensor at a time.

`torch.save` needs every tensor in memory at once. Instead, `TorchSaveWriter` lets torch
write the file's skeleton (its pickle and zip records, with room left for the data)
from fake tensors that own no memory (`torch.serialization.skip_data`), asks
`torch.load(map_location="meta")` where each tensor's bytes go, writes each tensor there
as it arrives, and finally puts the right CRC-32 of each data record into the zip's
central directory and data descriptors. The result is an ordinary `torch.save` file
(it passes `zipfile.testzip`); only one tensor is in memory at a time.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import Llama2Error
from .checkpoint import TensorSpec
from .safetensors_file import write_tensor_bytes

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... file name length, extra length
_CENTRAL_ENTRY_BYTES = 46
_END_OF_CENTRAL_DIRECTORY = b"PK\x05\x06"
_ZIP64_END_OF_CENTRAL_DIRECTORY = b"PK\x06\x06"
_DATA_DESCRIPTOR = b"PK\x07\x08"
_HAS_DATA_DESCRIPTOR = 0x08
_MAX_TAIL = 0xFFFF + 22 + 20 + 56  # longest comment + end record + zip64 locator + zip64 end record


class TorchSaveWriter:
    """A `torch.save` file of a dict of tensors, filled one tensor at a time (a context manager).

    Args:
        path: the file to create (the caller makes it atomic).
        specs: name -> `TensorSpec` of every tensor the dict will hold, in order.

    Raises:
        Llama2Error: this torch cannot report where the skeleton's tensors are stored.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec]):
        self.path = path
        self._specs = dict(specs)
        _write_skeleton(path, self._specs)
        self._offsets = _data_offsets(path)
        self._crcs: dict[int, int] = {}
        self._file: BinaryIO = path.open("r+b")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store tensor `name`, which must have the announced shape and dtype."""
        spec = self._specs.get(name)
        if spec is None or (tuple(tensor.shape), tensor.dtype) != spec:
            raise Llama2Error(f"{self.path}: tensor {name} {list(tensor.shape)} {tensor.dtype} was not announced")
        data = tensor.detach().cpu().contiguous()
        offset = self._offsets[name]
        self._file.seek(offset)
        write_tensor_bytes(self._file, data)
        self._crcs[offset] = zlib.crc32(memoryview(data.reshape(-1).view(torch.uint8).numpy()))

    def __enter__(self) -> TorchSaveWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Close the file; when the block succeeded, check every tensor was written and set the CRCs."""
        self._file.close()
        if error is not None:
            return
        unwritten = [name for name, offset in self._offsets.items() if offset not in self._crcs]
        if unwritten:
            raise Llama2Error(f"{self.path}: tensor {unwritten[0]} was never written")
        _patch_crcs(self.path, self._crcs)


def _write_skeleton(path: Path, specs: Mapping[str, TensorSpec]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = {name: torch.empty(spec.shape, dtype=spec.dtype) for name, spec in specs.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, path)


def _data_offsets(path: Path) -> dict[str, int]:
    """Name -> file offset of each tensor's bytes, as torch itself computes them."""
    placed = torch.load(path, map_location="meta", weights_only=True)
    offsets = {}
    for name, tensor in placed.items():
        offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
        if offset is None:
            raise Llama2Error(f"{path}: this torch version does not report storage offsets; cannot stream the file")
        offsets[name] = offset + tensor.storage_offset() * tensor.element_size()
    return offsets


def _patch_crcs(path: Path, crcs: Mapping[int, int]) -> None:
    """Set the CRC-32 of the zip records whose data starts at the offsets in `crcs`."""
    with path.open("r+b") as file:
        infos = zipfile.ZipFile(file).infolist()
        for info, entry in zip(infos, _central_entries(file, len(infos))):
            data_offset = _data_start(file, info.header_offset)
            crc = crcs.get(data_offset)
            if crc is None:
                continue
            _put_u32(file, entry + 16, crc)
            if info.flag_bits & _HAS_DATA_DESCRIPTOR:
                end = data_offset + info.file_size
                file.seek(end)
                _put_u32(file, end + (4 if file.read(4) == _DATA_DESCRIPTOR else 0), crc)
            else:
                _put_u32(file, info.header_offset + 14, crc)


def _data_start(file: BinaryIO, header_offset: int) -> int:
    file.seek(header_offset)
    fields = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    return header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def _central_entries(file: BinaryIO, count: int) -> list[int]:
    """Offsets of the first `count` central directory entries."""
    size = file.seek(0, 2)
    tail_start = max(0, size - _MAX_TAIL)
    file.seek(tail_start)
    tail = file.read()
    end = tail.rfind(_END_OF_CENTRAL_DIRECTORY)
    position = struct.unpack_from("<I", tail, end + 16)[0]
    if position == 0xFFFFFFFF:
        zip64 = tail.rfind(_ZIP64_END_OF_CENTRAL_DIRECTORY, 0, end)
        position = struct.unpack_from("<Q", tail, zip64 + 48)[0]
    entries = []
    for _ in range(count):
        file.seek(position)
        fixed = file.read(_CENTRAL_ENTRY_BYTES)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", fixed, 28)
        entries.append(position)
        position += _CENTRAL_ENTRY_BYTES + name_len + extra_len + comment_len
    return entries


def _put_u32(file: BinaryIO, offset: int, value: int) -> None:
    file.seek(offset)
    file.write(struct.pack("<I", value))
