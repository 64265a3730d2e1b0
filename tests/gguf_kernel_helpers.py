"""Test helpers for the GGUF kernels: test weights, ground truth (gguf's own quantizer and
dequantizer), and an exact emulation of the matmul kernel's arithmetic."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

Q4_0, Q4_1, Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q8_0)
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
BLOCK_BYTES = {qtype: gguf.GGML_QUANT_SIZES[T(qtype)][1] for qtype in (Q4_0, Q4_1, Q8_0)}


def make_weight(qtype: int, n: int, k: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """Raw GGUF bytes [N, K/32 * block_bytes] of a random [N, K] weight."""
    w = (np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32) * scale).astype(np.float32)
    return gguf.quants.quantize(w, T(qtype))


def dequantize(raw: np.ndarray, qtype: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, T(qtype))


def parse_blocks(raw: np.ndarray, qtype: int, k: int):
    """(d [N, nb] fp32, m [N, nb] fp32 or None, q [N, nb, 32] int32 as used in the integer dot)."""
    n = raw.shape[0]
    blocks = raw.reshape(n, k // 32, BLOCK_BYTES[qtype])
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == Q8_0:
        return d, None, blocks[..., 2:].copy().view(np.int8).astype(np.int32)
    off = 2 if qtype == Q4_0 else 4
    qs = blocks[..., off : off + 16]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int32)
    if qtype == Q4_0:
        return d, None, q - 8
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return d, m, q


def quantize_acts_q8_k(x: np.ndarray):
    """The K-quant kernels' activations in numpy, llama.cpp's Q8_K (quantize_row_q8_K_ref): per
    256 values, max = the first of the largest magnitude, iscale = -127 / max (fp32),
    q = min(127, round_half_even(iscale * x)), d = 1 / iscale; an all-zero block is 0."""
    mrows, k = x.shape
    xb = x.astype(np.float32).reshape(mrows, k // 256, 256)
    first = np.abs(xb).argmax(-1)[..., None]  # argmax: the first of equal magnitudes
    peak = np.take_along_axis(xb, first, -1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(peak == 0, np.float32(0), np.float32(-127) / peak).astype(np.float32)
        d = np.where(peak == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)
    q = np.minimum(127, np.rint((iscale[..., None] * xb).astype(np.float32))).astype(np.int32)
    return q, d


def quantize_acts(x: np.ndarray):
    """The kernel's activation quantization in numpy: per block of 32 values, d = amax / 127
    (fp32), q = round_half_even(x * (1 / d))."""
    mrows, k = x.shape
    xb = x.astype(np.float32).reshape(mrows, k // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.rint(xb * inv[..., None]).astype(np.int32)
    return q, d


def emulate(x: torch.Tensor, raw: np.ndarray, qtype: int, n: int, k: int):
    """Exact emulation of the kernel's arithmetic up to the order of the fp32 additions.

    Returns (y, bound): y [M, N] float64 = sum over blocks of
    fp32(d_w * d_x) * isum (+ m_w * fp32(d_x * sumq) for Q4_1), every term exact in float64,
    and a bound [M, N] on what fp32 accumulation of partial sums (any split of a block's
    products into lanes, any order) can change: (blocks + 32) * 2^-24 * sum of |terms|,
    with a block's |term| taken as |s| * sum_j |w_j q_j|.
    """
    q, dx = quantize_acts(x.float().numpy())
    dw, mw, wq = parse_blocks(raw, qtype, k)
    nb = k // 32
    # isum[m, n, b] via float64 batched matmul (integers below 2^53: exact).
    qt = torch.from_numpy(q).double().permute(1, 2, 0)  # [nb, 32, M]
    wt = torch.from_numpy(wq).double().permute(1, 0, 2)  # [nb, N, 32]
    isum = torch.bmm(wt, qt).permute(2, 1, 0)  # [M, N, nb]
    iabs = torch.bmm(wt.abs(), qt.abs()).permute(2, 1, 0)
    s = torch.from_numpy((dx[:, None, :] * dw[None, :, :]).astype(np.float32)).double()  # fp32 product
    terms = s * isum
    abs_terms = s.abs() * iabs
    if qtype == Q4_1:
        sumq = q.sum(-1).astype(np.float32)
        xs = torch.from_numpy((dx * sumq).astype(np.float32)).double()  # [M, nb]
        mterm = torch.from_numpy(mw).double()[None] * xs[:, None, :]
        terms = terms + mterm
        abs_terms = abs_terms + mterm.abs()
    y = terms.sum(-1)
    bound = (nb + 32) * 2.0**-24 * abs_terms.sum(-1)
    return y, bound
