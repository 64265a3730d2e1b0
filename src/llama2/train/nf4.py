"""Frozen quantized linear bases for QLoRA: 4-bit NormalFloat (NF4) and int8.

NF4 is QLoRA's data type (Dettmers et al. 2023, section 3): weights are split into
blocks of 64, each scaled by its absolute maximum into [-1, 1] and rounded to the
nearest of 16 levels placed at quantiles of a standard normal distribution (with an
exact zero). Two 4-bit codes are packed per byte, first value in the high nibble as
in bitsandbytes. Double quantization of the block scales is not implemented (the
scales stay float32: 0.5 bits per weight instead of 0.127).

Bases are frozen: `frozen_linear` multiplies by the dequantized weight in the forward
pass and dequantizes again in the backward pass, so no full-precision weight stays
alive between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import Int8Linear

NF4_BLOCK_SIZE = 64

#: The 16 NF4 levels (QLoRA appendix E; bitsandbytes' table), ascending.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_quantize(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF4 quantization.

    Args:
        weight: any float tensor; flattened in row-major order, zero-padded to whole blocks.
        block_size: values per scale (even).

    Returns:
        (codes, absmax): uint8 [ceil(n / 2)] with two 4-bit level indices per byte (high
        nibble first), and float32 [number of blocks] scales.
    """
    flat = weight.detach().float().reshape(-1)
    flat = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)  # [blocks, block_size]
    absmax = flat.abs().amax(dim=1)
    normalized = flat / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = torch.tensor(NF4_LEVELS, device=flat.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8).view(-1, 2)  # nearest level
    return (codes[:, 0] << 4) | codes[:, 1], absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, block_size: int = NF4_BLOCK_SIZE):
    """Float32 tensor of `shape` from `nf4_quantize`'s codes and scales."""
    levels = torch.tensor(NF4_LEVELS, device=codes.device)
    indices = torch.stack((codes >> 4, codes & 0xF), dim=1).view(-1, block_size).long()  # [blocks, block_size]
    values = levels[indices] * absmax[:, None]
    return values.view(-1)[: shape.numel()].view(shape)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (no bias)."""

    def __init__(self, weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        codes, absmax = nf4_quantize(weight, block_size)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)

    def dequantize(self) -> torch.Tensor:
        return nf4_dequantize(
            self.codes, self.absmax, torch.Size((self.out_features, self.in_features)), self.block_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self)


QUANTIZERS = {"nf4": NF4Linear, "int8": Int8Linear.from_float}


def quantize_frozen(linear: nn.Linear, kind: str) -> nn.Module:
    """The frozen quantized copy ("nf4" or "int8") of a bias-free linear layer's weight."""
    return QUANTIZERS[kind](linear.weight.detach())


class _DequantizedMatmul(torch.autograd.Function):
    """x W^T for a frozen quantized W, dequantized again in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return F.linear(x, base.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.base.dequantize().to(grad_output.dtype)
        return grad_output @ weight, None


def frozen_linear(x: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """x times a frozen base: an `nn.Linear`, or a quantized module with `dequantize()`."""
    if isinstance(base, nn.Linear):
        return base(x)
    return _DequantizedMatmul.apply(x, base)
