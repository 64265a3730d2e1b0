"""GGML K-quant blocks (Q4_K, Q5_K, Q6_K) from float weights, byte for byte as llama.cpp writes them.

llama.cpp's reference quantizers (``quantize_row_q{4,5,6}_K_ref`` in ggml-quants.c, which
``llama_model_quantize`` runs when no importance matrix is given) choose each sub-block's
scale by a small search; the `gguf` package has no K-quant quantizer. This module
follows the same algorithms with numpy, vectorised over many blocks at once:

- Q4_K / Q5_K: super-blocks of 256 values in 8 sub-blocks of 32, each quantized as
  ``scale * q - min`` (q in 0..15 / 0..31) by an iterative least-squares search over
  candidate scales (llama.cpp's ``make_qkx2_quants``: weights ``rms + |x|``, the minimum
  clamped to <= 0); the 8 scales and 8 minimums are then stored as 6-bit integers of two
  fp16 super-scales (packed into 12 bytes) and the values requantized with the stored ones.
- Q6_K: 16 sub-blocks of 16 values, symmetric ``scale * q`` with q in -32..31, the scale
  searched over 19 candidates (``make_qx_quants``, weights ``x^2``); the 16 scales as int8
  of one fp16 super-scale.

Bit-exactness: every sum runs over a sub-block's values in index order in float32 (the
arrays are laid out values-major, so numpy's reduction over axis 0 adds them one by one),
products are evaluated in C's left-to-right order, and C's ``nearest_int`` (the
``+ 1.5 * 2**23`` trick) is reproduced on the float bits. llama.cpp builds these files
without fused multiply-adds, so plain float32 numpy gives the same bytes.

Other GGML types go to `gguf.quants.quantize` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, ...),
whose reference implementations match llama.cpp's.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from gguf.quants import quantize as _gguf_quantize

from ..errors import Llama2Error

T = GGMLQuantizationType

K_TYPES = frozenset({T.Q4_K, T.Q5_K, T.Q6_K})
"""The types this module quantizes itself."""

# Super-blocks per numpy step: the working arrays (values-major, float32) stay within a few MB.
_CHUNK_BLOCKS = 512
_GROUP_MAX_EPS = np.float32(1e-15)
_ROUNDING_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds a float32 to an integer, ties to even
f32 = np.float32


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`values` (float, rows last) in GGML type `qtype` as llama.cpp's reference quantizer writes it.

    Args:
        values: an array whose last dimension is a whole number of `qtype`'s blocks.
        qtype: any type `gguf.quants` quantizes, or Q4_K / Q5_K / Q6_K.

    Returns:
        uint8 blocks, shape ``values.shape[:-1] + (row bytes,)`` (for float types, the values
        in that type, as `gguf.quants.quantize` returns them).

    Raises:
        Llama2Error: a row that is not a whole number of blocks, or values that are not finite.
    """
    qtype = T(qtype)
    if qtype not in K_TYPES:
        return _gguf_quantize(np.asarray(values, dtype=np.float32), qtype)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0 or values.shape[-1] % QK_K:
        raise Llama2Error(f"{qtype.name} needs rows of a multiple of {QK_K} values, not shape {values.shape}")
    if not np.isfinite(values).all():
        raise Llama2Error(f"cannot quantize non-finite values to {qtype.name}")
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    blocks = values.reshape(-1, QK_K)  # [super-blocks, 256]
    out = np.empty((blocks.shape[0], block_bytes), dtype=np.uint8)
    encode = _ENCODERS[qtype]
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = encode(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * block_bytes)


# --- helpers ---------------------------------------------------------------------------------


def nearest_int(values: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: float32 to int32 by adding 1.5 * 2**23 and reading the mantissa bits."""
    bits = (values.astype(np.float32, copy=False) + _ROUNDING_MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _rounded(values: np.ndarray, low: int, high: int) -> np.ndarray:
    """``MAX(low, MIN(high, nearest_int(values)))`` as float32 (the integers the sums multiply)."""
    return np.clip(nearest_int(values), low, high).astype(np.float32)


def _sum(values: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (a sub-block's values) one by one in index order, in float32, as C's loops do."""
    return np.add.reduce(values, axis=0, dtype=np.float32)


def _fp16(values: np.ndarray) -> np.ndarray:
    """float32 -> fp16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return values.astype(np.float16)


# --- Q4_K / Q5_K: scale and minimum per sub-block of 32 --------------------------------------


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, minimum and levels of sub-blocks by llama.cpp's ``make_qkx2_quants`` (squared error).

    Args:
        x, weights: [values per sub-block, sub-blocks] float32 (values-major).
        nmax: the largest level (15 or 31).
        rmin, rdelta, nstep: the candidate inverse scales ``(nmax + rmin + rdelta * i) / (max - min)``.

    Returns:
        (scale [S], minimum [S] (>= 0, subtracted), levels [n, S] float32 in 0..nmax).
    """
    low = x.min(axis=0)
    high = x.max(axis=0)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)
    low = np.minimum(low, f32(0))
    flat = high == low
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(nmax) / (high - low)
        scale = f32(1) / iscale
        levels = _rounded(iscale * (x - low), 0, nmax)
        best_error = _sum(weights * np.square(scale * levels + low - x))
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (high - low)
            trial = _rounded(iscale * (x - low), 0, nmax)
            weighted = weights * trial
            sum_l = _sum(weighted)
            sum_l2 = _sum(weighted * trial)
            sum_xl = _sum(weighted * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min = np.where(positive, f32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            error = _sum(weights * np.square(this_scale * trial + this_min - x))
            better = (det > 0) & (error < best_error)
            levels = np.where(better, trial, levels)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale)
            low = np.where(better, this_min, low)
    levels = np.where(flat, f32(0), levels)
    scale = np.where(flat, f32(0), scale)
    return scale, -low, levels


def _sub_block_weights(x: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's importance of each value: the sub-block's RMS plus the value's magnitude."""
    rms = np.sqrt(_sum(x * x) / f32(32))
    return rms + np.abs(x)


def _six_bit(values: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """Per-sub-block scales (or minimums) [blocks, 8] as 6-bit integers of ``largest / 63``."""
    inverse = np.where(largest > 0, f32(63) / np.where(largest > 0, largest, f32(1)), f32(0))
    return np.minimum(nearest_int(inverse[:, None] * values) & 0xFF, 63).astype(np.uint8)


def _pack_k4_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit minimums [blocks, 8] -> the 12 bytes of ``get_scale_min_k4``."""
    packed = np.empty((scales.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = scales[:, 0:4] | ((scales[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mins[:, 0:4] | ((mins[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (scales[:, 4:8] & 0xF) | ((mins[:, 4:8] & 0xF) << 4)
    return packed


def _scale_min_blocks(
    blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The shared part of Q4_K and Q5_K for [B, 256] values.

    Returns:
        (d and dmin as fp16 [B, 2], the 12 packed scale bytes [B, 12], levels [B, 256] uint8).
    """
    n_blocks = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n_blocks * 8, 32).T)  # [32, B*8]: values-major sub-blocks
    scale, minimum, levels = make_qkx2_quants(x, _sub_block_weights(x), nmax, rmin, rdelta, nstep)
    scale = scale.reshape(n_blocks, 8)
    minimum = minimum.reshape(n_blocks, 8)
    max_scale = np.maximum(scale.max(axis=1), f32(0))
    max_min = np.maximum(minimum.max(axis=1), f32(0))
    scale_q = _six_bit(scale, max_scale)
    min_q = _six_bit(minimum, max_min)
    supers = np.stack([_fp16(max_scale / f32(63)), _fp16(max_min / f32(63))], axis=1)
    d = supers[:, 0].astype(np.float32)[:, None] * scale_q.astype(np.float32)  # [B, 8]
    dm = supers[:, 1].astype(np.float32)[:, None] * min_q.astype(np.float32)
    values = blocks.reshape(n_blocks, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = _rounded((values + dm[..., None]) / d[..., None], 0, nmax)
    first = levels.T.reshape(n_blocks, 8, 32)
    final = np.where((d != 0)[..., None], requantized, first).astype(np.uint8).reshape(n_blocks, QK_K)
    return supers, _pack_k4_scales(scale_q, min_q), final


def _low_nibbles(levels: np.ndarray) -> np.ndarray:
    """[B, 256] levels -> 128 bytes: each 64-value chunk as 32 bytes, values j | (j + 32) << 4."""
    chunks = levels.reshape(-1, 4, 2, 32) & 0xF
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)


def encode_q4_k(blocks: np.ndarray) -> np.ndarray:
    """[B, 256] float32 -> [B, 144] Q4_K blocks (d, dmin, 12 scale bytes, 128 nibble bytes)."""
    supers, scales, levels = _scale_min_blocks(blocks, 15, -1.0, 0.1, 20)
    return np.concatenate([supers.view(np.uint8), scales, _low_nibbles(levels)], axis=1)


def encode_q5_k(blocks: np.ndarray) -> np.ndarray:
    """[B, 256] float32 -> [B, 176] Q5_K blocks (d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes)."""
    supers, scales, levels = _scale_min_blocks(blocks, 31, -0.5, 0.1, 15)
    high = (levels.reshape(-1, 4, 2, 32) >> 4).astype(np.uint8)  # [B, chunk, half, 32]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2*chunk + half
    qh = np.bitwise_or.reduce(high << shifts[None, :, :, None], axis=(1, 2))
    return np.concatenate([supers.view(np.uint8), scales, qh, _low_nibbles(levels)], axis=1)


# --- Q6_K: symmetric scale per sub-block of 16 ----------------------------------------------


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and levels of sub-blocks by llama.cpp's ``make_qx_quants`` (rmse_type 1: weights x^2).

    Args:
        x: [values per sub-block, sub-blocks] float32 (values-major).
        nmax: levels run over -nmax..nmax-1.

    Returns:
        (scale [S], levels [n, S] float32 in 0..2*nmax-1, i.e. level + nmax; 0 for all-zero sub-blocks).
    """
    first_peak = np.abs(x).argmax(axis=0)
    peak = np.take_along_axis(x, first_peak[None, :], axis=0)[0]  # the signed value of largest magnitude
    zero = np.abs(peak) < _GROUP_MAX_EPS
    weights = x * x
    weighted_x = weights * x
    with np.errstate(divide="ignore", invalid="ignore"):

        def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            levels = _rounded(iscale * x, -nmax, nmax - 1)
            return levels, _sum(weighted_x * levels), _sum(weights * levels * levels)

        levels, sum_lx, sum_l2 = trial(f32(-nmax) / peak)
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, f32(0))
        best = scale * sum_lx
        for step in (*range(-9, 0), *range(1, 10)):
            candidate, sum_lx, sum_l2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
            better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
            levels = np.where(better, candidate, levels)
            scale = np.where(better, sum_lx / sum_l2, scale)
            best = np.where(better, scale * sum_lx, best)
    levels = np.where(zero, f32(0), levels + f32(nmax))
    return np.where(zero, f32(0), scale), levels


def encode_q6_k(blocks: np.ndarray) -> np.ndarray:
    """[B, 256] float32 -> [B, 210] Q6_K blocks (128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d)."""
    n_blocks = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n_blocks * 16, 16).T)  # [16, B*16]
    scale, first = make_qx_quants(x, 32)
    scale = scale.reshape(n_blocks, 16)
    peak_index = np.abs(scale).argmax(axis=1)
    max_scale = np.take_along_axis(scale, peak_index[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(empty, f32(0), f32(-128) / np.where(empty, f32(1), max_scale))
        d = _fp16(f32(1) / np.where(empty, f32(1), iscale))
        d = np.where(empty, np.float16(0), d)
        scales = np.minimum(nearest_int(iscale[:, None] * scale), 127).astype(np.int8)
        sub_d = d.astype(np.float32)[:, None] * scales.astype(np.float32)  # [B, 16]
        requantized = _rounded(blocks.reshape(n_blocks, 16, 16) / sub_d[..., None], -32, 31) + f32(32)
    first = first.T.reshape(n_blocks, 16, 16)
    levels = np.where((sub_d != 0)[..., None], requantized, first).astype(np.uint8).reshape(n_blocks, 2, 4, 32)
    nibbles = levels & 0xF  # [B, half, quarter, 32]: bytes hold quarters 0|2 then 1|3 of each half
    ql = np.concatenate([nibbles[:, :, i] | (nibbles[:, :, i + 2] << 4) for i in (0, 1)], axis=2).reshape(n_blocks, 128)
    shifts = (2 * np.arange(4)).astype(np.uint8)
    qh = np.bitwise_or.reduce((levels >> 4) << shifts[None, None, :, None], axis=2).reshape(n_blocks, 64)
    out = np.concatenate([ql, qh, scales.view(np.uint8), d[:, None].view(np.uint8)], axis=1)
    out[empty] = 0
    return out


_ENCODERS = {T.Q4_K: encode_q4_k, T.Q5_K: encode_q5_k, T.Q6_K: encode_q6_k}
