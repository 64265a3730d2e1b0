"""GGML block dequantization in pure PyTorch (CPU or CUDA, vectorized over blocks).

Every GGML type stores a tensor as a run of fixed-size blocks: `block_size` values
packed into `type_size` bytes (see `gguf.constants.GGML_QUANT_SIZES`). The functions
here turn the raw block bytes of one tensor into float32, reproducing the reference
numpy implementation in `gguf.quants` bit for bit (the same float32 operations in the
same order). Types without a torch implementation here fall back to `gguf.quants`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from ..errors import Llama2Error

T = GGMLQuantizationType

# Upper bound on the values dequantized per step, which bounds the temporaries a
# dequantizer allocates on top of its float32 output.
_CHUNK_VALUES = 1 << 22


def ggml_type(value: int | GGMLQuantizationType) -> GGMLQuantizationType:
    """The `GGMLQuantizationType` for `value`, or `Llama2Error` if there is none."""
    try:
        return GGMLQuantizationType(value)
    except ValueError:
        raise Llama2Error(f"unknown GGML tensor type {value!r}") from None


def block_size_bytes(qtype: int | GGMLQuantizationType) -> tuple[int, int]:
    """Block geometry of a GGML type.

    Args:
        qtype: the GGML type.

    Returns:
        ``(values_per_block, bytes_per_block)``, e.g. ``(32, 20)`` for Q4_1 and ``(1, 4)``
        for F32.
    """
    qtype = ggml_type(qtype)
    if qtype not in GGML_QUANT_SIZES:
        raise Llama2Error(f"GGML type {qtype.name} has no known block size")
    return GGML_QUANT_SIZES[qtype]


def tensor_nbytes(qtype: int | GGMLQuantizationType, shape: Sequence[int]) -> int:
    """Bytes that a tensor of `shape` (torch order, rows last) takes in GGML type `qtype`.

    Raises:
        Llama2Error: if the row length is not a whole number of blocks.
    """
    block_size, type_size = block_size_bytes(qtype)
    row = shape[-1] if len(shape) else 1
    if row % block_size:
        raise Llama2Error(
            f"tensor shape {tuple(shape)} does not fit GGML type {ggml_type(qtype).name}: "
            f"row length {row} is not a multiple of its block size {block_size}"
        )
    return prod(shape) // block_size * type_size


def dequantize(raw: torch.Tensor, qtype: int | GGMLQuantizationType, shape: Sequence[int]) -> torch.Tensor:
    """Decode the raw bytes of one GGML tensor to float32.

    Args:
        raw: uint8 tensor holding exactly the tensor's blocks (any shape; read flat), on
            any device. It is never modified and the result never shares its memory.
        qtype: GGML type of the data.
        shape: torch shape of the tensor (GGUF lists the dimensions in reverse).

    Returns:
        A new float32 tensor of `shape` on `raw`'s device.

    Raises:
        Llama2Error: if `raw` is not uint8, its size does not match `shape`, or the type
            can be decoded neither here nor by `gguf.quants`.
    """
    qtype = ggml_type(qtype)
    shape = tuple(int(n) for n in shape)
    if raw.dtype != torch.uint8:
        raise Llama2Error(f"{qtype.name} data must be raw uint8 bytes, got a {raw.dtype} tensor")
    expected = tensor_nbytes(qtype, shape)
    if raw.numel() != expected:
        raise Llama2Error(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)  # [n_blocks, type_size]
    decode = _DEQUANTIZERS.get(qtype)
    if decode is None:
        values = _dequantize_with_gguf(blocks, qtype)
    else:
        values = _dequantize_in_chunks(blocks, decode, block_size)
    return values.reshape(shape)


def dequantize_blocks(blocks: torch.Tensor, qtype: int | GGMLQuantizationType) -> torch.Tensor:
    """Decode GGML blocks [n, type_size] (uint8) of a type with a torch decoder to float32 [n, block_size].

    No checks and no loop: the building block for decoding inside a model's forward
    (a few embedding rows, a layer per prefill chunk), which torch.compile can trace.
    """
    return _DEQUANTIZERS[ggml_type(qtype)](blocks)


def has_torch_dequantizer(qtype: int | GGMLQuantizationType) -> bool:
    """Whether `qtype` is decoded by torch code here (rather than by `gguf.quants`)."""
    return ggml_type(qtype) in _DEQUANTIZERS


def _dequantize_in_chunks(
    blocks: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], block_size: int
) -> torch.Tensor:
    """Apply `decode` to groups of blocks, writing into one float32 output."""
    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks, block_size, dtype=torch.float32, device=blocks.device)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, n_blocks, step):
        out[start : start + step] = decode(blocks[start : start + step])
    return out


def _dequantize_with_gguf(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Decode with gguf's numpy reference (types without a torch implementation)."""
    data = blocks.cpu().numpy().reshape(-1)
    try:
        values = _gguf_dequantize(data, qtype)
    except NotImplementedError:
        raise Llama2Error(f"cannot dequantize GGML type {qtype.name}: no decoder for it") from None
    values = np.ascontiguousarray(values, dtype=np.float32)
    return torch.from_numpy(values).to(blocks.device)


# ---------------------------------------------------------------------------
# Field helpers. `blocks` is always [n_blocks, type_size] uint8.


def _f16(field: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 stored in 2 bytes per block -> [n_blocks, 1] float32."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def _unpack(field: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Split bytes into `bits`-wide fields in ggml's order.

    For every run of `group` bytes, the lowest field of each byte comes first, then the
    next higher one, and so on: ``x.reshape(n, -1, 1, group) >> [0, bits, ...]`` in
    gguf.quants.
    """
    n = field.shape[0]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=field.device).view(1, 1, -1, 1)
    parts = (field.reshape(n, -1, 1, group) >> shifts) & ((1 << bits) - 1)  # [n, runs, 8 // bits, group]
    return parts.reshape(n, -1)


def _bits_le(field: torch.Tensor) -> torch.Tensor:
    """Bits of a little-endian bitmask, bit i of the mask as element i -> [n, 8 * bytes]."""
    n = field.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=field.device).view(1, 1, 8)
    return ((field.reshape(n, -1, 1) >> shifts) & 1).reshape(n, -1)  # [n, bytes * 8]


def _split(blocks: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.split(blocks, list(sizes), dim=1)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes of packed 6-bit scales and mins -> two [n, 8] uint8."""
    d, m, m_d = _split(scales, 4, 4, 4)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


# ---------------------------------------------------------------------------
# Dequantizers: [n_blocks, type_size] uint8 -> [n_blocks, block_size] float32.


def _dq_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def _dq_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks)


def _dq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    bits = blocks.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32)


def _dq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2, 16)
    q = _unpack(qs, 16, 4).to(torch.float32) - 8
    return _f16(d) * q


def _dq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(blocks, 2, 2, 16)
    q = _unpack(qs, 16, 4).to(torch.float32)
    return _f16(d) * q + _f16(m)


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit values: low nibbles plus one high bit each -> [n, 32] uint8."""
    return _unpack(qs, 16, 4) | (_bits_le(qh) << 4)


def _dq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh, qs = _split(blocks, 2, 4, 16)
    q = _q5_values(qh, qs).to(torch.float32) - 16
    return _f16(d) * q


def _dq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = _split(blocks, 2, 2, 4, 16)
    q = _q5_values(qh, qs).to(torch.float32)
    return _f16(d) * q + _f16(m)


def _dq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2, 32)
    return qs.contiguous().view(torch.int8).to(torch.float32) * _f16(d)


def _dq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2, 2)
    dl = (_f16(d) * (scales & 0x0F).to(torch.float32)).reshape(n, QK_K // 16, 1)
    ml = (_f16(dmin) * (scales >> 4).to(torch.float32)).reshape(n, QK_K // 16, 1)
    q = _unpack(qs, 32, 2).reshape(n, QK_K // 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12, 2)
    low, high = _split(scales, 8, 4)
    sc = _unpack(low, 8, 4) | (_unpack(high, 4, 2) << 4)  # [n, 16] 6-bit scales
    dl = (_f16(d) * (sc.to(torch.float32) - 32)).reshape(n, 16, 1)
    ql = _unpack(qs, 32, 2).reshape(n, 16, QK_K // 16)
    qh = _unpack(hmask, 32, 1).reshape(n, 16, QK_K // 16)
    # The high bit *subtracts* 4 when it is clear (ggml's convention).
    q = ql.to(torch.float32) - 4 * (1 - qh).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _dq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qs = _split(blocks, 2, 2, 12, QK_K // 2)
    sc, mn = _k_scales_mins(scales)
    dl = (_f16(d) * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _unpack(qs, 32, 4).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, QK_K // 8, QK_K // 2)
    sc, mn = _k_scales_mins(scales)
    dl = (_f16(d) * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _unpack(qs, 32, 4) | (_unpack(qh, 32, 1) << 4)  # [n, 256]
    q = q.reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16, 2)
    dl = (_f16(d) * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    q = _unpack(ql, 64, 4) | (_unpack(qh, 32, 2) << 4)  # [n, 256]
    q = q.reshape(n, 16, 16).to(torch.float32) - 32
    return (dl * q).reshape(n, QK_K)


_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _dq_f32,
    T.F16: _dq_f16,
    T.BF16: _dq_bf16,
    T.Q4_0: _dq_q4_0,
    T.Q4_1: _dq_q4_1,
    T.Q5_0: _dq_q5_0,
    T.Q5_1: _dq_q5_1,
    T.Q8_0: _dq_q8_0,
    T.Q2_K: _dq_q2_k,
    T.Q3_K: _dq_q3_k,
    T.Q4_K: _dq_q4_k,
    T.Q5_K: _dq_q5_k,
    T.Q6_K: _dq_q6_k,
}

TORCH_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_DEQUANTIZERS)
"""GGML types decoded by torch code in this module."""
