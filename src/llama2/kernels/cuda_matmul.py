"""Weight-only matrix products for a few rows on CUDA, written in Triton.

Decode steps multiply one row (or a few: batched decode) by every weight matrix, so
their speed is the rate at which the weights stream from GPU memory. These kernels read
each weight once, in the layout it is stored in, and turn it into bfloat16 in registers
for the tensor cores: `y = x W^T` for x [M, K] with M <= 16 and W [N, K] as

- bfloat16 (`kind="bf16"`),
- int8 with one scale per output row (`kind="int8"`): W[n, k] = q[n, k] * scale[n],
- 4-bit codes in groups along K (`kind="int4"`): W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]
  with g = k // group_size. Codes are packed as in GGUF's Q4 blocks: each run of 32
  values is 16 bytes, byte j holding value j in its low nibble and value j + 16 in its
  high nibble (`pack_int4_codes`).

Every row of x is computed with the same tiles and order whatever M is (rows are padded
to one 16-row tile), so a row's result does not depend on the rest of the batch.
Triton is imported on first use: this module loads on machines without it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

MAX_ROWS = 16  # rows of x one call takes (one tensor-core tile)
HAS_TRITON = importlib.util.find_spec("triton") is not None


def pack_int4_codes(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K] (0..15) as bytes [N, K / 2], in GGUF's Q4 nibble order (see the module doc)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // 32, 2, 16)  # [N, K/32, (low, high), 16]
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4_codes`: bytes [N, K / 2] -> codes [N, K] (uint8)."""
    n = packed.shape[0]
    blocks = packed.reshape(n, -1, 16)  # [N, K/32, 16]
    return torch.stack((blocks & 15, blocks >> 4), dim=2).reshape(n, -1)


@functools.cache
def _kernels():
    """The Triton kernels, compiled on first use.

    Both kernels split K into `SPLIT` ranges (program axis 2) when asked: each range then
    writes float32 partial sums [SPLIT, M, N] that the caller adds up in a fixed order, so
    matrices with few output rows still spread over every multiprocessor.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def dense_or_int8(
        x_ptr,
        w_ptr,
        scale_ptr,
        y_ptr,
        M,
        N,
        K,
        k_chunk,
        stride_xm,
        stride_ym,
        stride_ys,
        INT8: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        rows = tl.arange(0, 16)  # x's rows padded to one tensor-core tile
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_start = tl.program_id(2) * k_chunk
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_chunk, K), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=rows[:, None] < M, other=0.0)
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=cols[:, None] < N, other=0)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        out = y_ptr + tl.program_id(2) * stride_ys + rows[:, None] * stride_ym + cols[None, :]
        in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
        if SPLIT == 1:
            if INT8:
                acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=in_bounds)
        else:
            tl.store(out, acc, mask=in_bounds)

    @triton.jit
    def int4_row(
        x_ptr,
        q_ptr,
        scale_ptr,
        zero_ptr,
        y_ptr,
        N,
        K,
        k_chunk,
        stride_xm,
        stride_ym,
        stride_ys,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        # One row of x (program axis 1) against BLOCK_N weight rows, on the CUDA cores: per
        # run of 32 values, sum(q * x) in float32, then scale * that + (zero - 8 * scale) * sum(x).
        RUNS: tl.constexpr = BLOCK_K // 32
        row = tl.program_id(1)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        run = tl.arange(0, RUNS)
        lane = tl.arange(0, 16)
        n_groups = K // GROUP
        k_start = tl.program_id(2) * k_chunk
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + k_chunk, K), BLOCK_K):
            first = k0 + run * 32  # [RUNS] first value of each run
            code_ptrs = q_ptr + cols[:, None, None] * (K // 2) + (first // 2)[None, :, None] + lane[None, None, :]
            codes = tl.load(code_ptrs, mask=cols[:, None, None] < N, other=0)  # [BLOCK_N, RUNS, 16] bytes
            x_ptrs = x_ptr + row * stride_xm + first[:, None] + lane[None, :]
            x_low = tl.load(x_ptrs).to(tl.float32)  # [RUNS, 16]: values j of each run
            x_high = tl.load(x_ptrs + 16).to(tl.float32)  # values j + 16
            dots = tl.sum(
                (codes & 15).to(tl.float32) * x_low[None] + (codes >> 4).to(tl.float32) * x_high[None], axis=2
            )
            x_sums = tl.sum(x_low + x_high, axis=1)  # [RUNS]
            meta = cols[:, None] * n_groups + (first // GROUP)[None, :]  # [BLOCK_N, RUNS]
            scale = tl.load(scale_ptr + meta, mask=cols[:, None] < N, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + meta, mask=cols[:, None] < N, other=0.0).to(tl.float32)
            acc += tl.sum(scale * dots + (zero - 8.0 * scale) * x_sums[None, :], axis=1)
        out = y_ptr + tl.program_id(2) * stride_ys + row * stride_ym + cols
        if SPLIT == 1:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=cols < N)
        else:
            tl.store(out, acc, mask=cols < N)

    return triton, dense_or_int8, int4_row


# Tile sizes and launch settings per kind; `benchmarks/gpu_gemv.py` measures the alternatives.
DEFAULT_CONFIGS = {
    "bf16": {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    "int8": {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    "int4": {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
}


def tuned_config(kind: str, n: int, k: int) -> dict:
    """Launch settings for one weight shape: the tuned ones where measured, else the kind's default."""
    return TUNED_CONFIGS.get((kind, n, k), DEFAULT_CONFIGS[kind])


# Measured best settings per (kind, N, K) on an H200 (`benchmarks/gpu_gemv.py`).
TUNED_CONFIGS: dict[tuple[str, int, int], dict] = {}


def weight_only_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    kind: str,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    group_size: int = 32,
    config: dict | None = None,
) -> torch.Tensor:
    """y = x W^T for at most `MAX_ROWS` rows of bfloat16 x [M, K] (see the module doc for W).

    Args:
        weight: [N, K] bfloat16 or int8, or [N, K / 2] uint8 int4 codes.
        kind: "bf16", "int8" or "int4".
        scale: int8: [N]; int4: [N, K / group_size].
        zero: int4 only: [N, K / group_size].
        group_size: int4 only: values per scale (a multiple of 32).
        config: tile sizes and launch settings (default: `tuned_config`).

    Returns:
        [M, N] in x's dtype.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"weight_only_matmul takes at most {MAX_ROWS} rows, got {m}")
    config = dict(config or tuned_config(kind, n, k))
    while k % config["BLOCK_K"] and config["BLOCK_K"] > 32:
        config["BLOCK_K"] //= 2  # the largest tile width that divides K
    if k % config["BLOCK_K"]:
        raise ValueError(f"weight_only_matmul needs K divisible by 32, got {k}")
    triton, dense_or_int8, int4_row = _kernels()
    x = x.contiguous()
    split = config.pop("SPLIT")
    k_chunk = triton.cdiv(triton.cdiv(k, config["BLOCK_K"]), split) * config["BLOCK_K"]  # whole tiles per range
    y = torch.empty(
        (m, n) if split == 1 else (split, m, n), dtype=x.dtype if split == 1 else torch.float32, device=x.device
    )
    strides = (x.stride(0), y.stride(-2), y.stride(0) if split > 1 else 0)
    if kind == "int4":
        grid = (triton.cdiv(n, config["BLOCK_N"]), m, split)
        int4_row[grid](x, weight, scale, zero, y, n, k, k_chunk, *strides, GROUP=group_size, SPLIT=split, **config)
    else:
        grid = (triton.cdiv(n, config["BLOCK_N"]), 1, split)
        scales = scale if kind == "int8" else weight  # unused pointer for bf16
        dense_or_int8[grid](
            x, weight, scales, y, m, n, k, k_chunk, *strides, INT8=kind == "int8", SPLIT=split, **config
        )
    if split == 1:
        return y
    total = y.sum(0)  # the ranges' partial sums in a fixed order
    return (total * scale.float() if kind == "int8" else total).to(x.dtype)


@torch.library.custom_op("llama2_cuda::weight_only_matmul", mutates_args=())
def weight_only_matmul_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    kind: str,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """`weight_only_matmul` as a PyTorch op, so compiled graphs (and their CUDA graphs) call it."""
    return weight_only_matmul(x, weight, kind, scale, zero, group_size)


@weight_only_matmul_op.register_fake
def _(x, weight, kind, scale, zero, group_size):
    return x.new_empty((x.shape[0], weight.shape[0]))


class DecodeLinear(nn.Module):
    """Wraps a bias-free bfloat16 `nn.Linear` or an `Int8Linear` on CUDA: products of up to
    `MAX_ROWS` rows run on `weight_only_matmul`, longer inputs on the wrapped layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.kind = "int8" if hasattr(layer, "scales") else "bf16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > MAX_ROWS:
            return self.layer(x)
        scale = self.layer.scales if self.kind == "int8" else None
        out = weight_only_matmul_op(flat.to(torch.bfloat16), self.layer.weight, self.kind, scale, None, 0)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def use_for_decode(model: nn.Module) -> int:
    """Wrap the model's CUDA layers the kernels take (bfloat16 `nn.Linear` without bias, `Int8Linear`)
    in `DecodeLinear`; returns how many were wrapped.

    Opt-in (`benchmarks/gpu_decode.py`'s "-triton" variants): the kernels stream weights
    faster than cuBLAS and Inductor in isolation, but a compiled 7B decode step using them
    has not yet been measured faster than without them.
    """
    if not HAS_TRITON:
        raise RuntimeError("llama2's CUDA matmuls need Triton")
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _takes(child):
                setattr(parent, name, DecodeLinear(child))
                wrapped += 1
    return wrapped


def _takes(layer: nn.Module) -> bool:
    from ..quant import Int8Linear  # quant's layers are built on this package's CPU kernels

    if type(layer) is nn.Linear:
        fits = layer.bias is None and layer.weight.dtype == torch.bfloat16
    else:
        fits = isinstance(layer, Int8Linear)
    return fits and layer.weight.is_cuda and layer.in_features % 32 == 0
