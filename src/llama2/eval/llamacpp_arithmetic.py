"""llama.cpp's CPU arithmetic for quantized weights, emulated on a float32 model (`--arithmetic llamacpp`).

llama.cpp's CPU dot products of a quantized weight row (Q4_0/Q4_1/Q5_x/Q8_0 ...) with an
activation row first quantize the activation row to 8 bits ("vec_dot_type" Q8_0 or Q8_1):
per block of 32 values, d = max|x| / 127 (stored as float16) and q = round(x / d). The
product is then computed exactly in integers and scaled, so it equals the product of the
dequantized weight row with the dequantized activations q * d. A model holding the
dequantized weights in float32 (`quant="none"`) whose linear inputs are rounded the same way
therefore reproduces llama.cpp's results up to the order of summation. That rounding moves
the default model's (Q4_1) perplexity by +0.75%, which is the whole gap between llama.cpp's
Q4_1 run and its run of the F32 conversion of the same weights (see docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

Q8_BLOCK = 32


def quantize_q8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded as llama.cpp's Q8_0/Q8_1 activation blocks round it (last dim a multiple of 32)."""
    shape = x.shape
    blocks = x.float().reshape(-1, shape[-1] // Q8_BLOCK, Q8_BLOCK)  # [rows, blocks, 32]
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    quantized = torch.round(blocks * inverse)  # llama.cpp's roundf rounds halves away from zero: ties are rare
    return (quantized * scale.half().float()).reshape(shape).to(x.dtype)


def _round_input(_module: nn.Module, args: tuple) -> tuple:
    return (quantize_q8_roundtrip(args[0]), *args[1:])


@contextmanager
def llamacpp_activations(model: nn.Module) -> Iterator[nn.Module]:
    """Round the input of every linear layer of `model`, and of a tied output projection, to Q8 blocks.

    The tied projection (the embedding matrix, not a module call) gets its input rounded
    through a hook on the final norm, whose output feeds only the projection.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features % Q8_BLOCK == 0]
    handles = [m.register_forward_pre_hook(_round_input) for m in linears]
    if getattr(model, "output", True) is None:
        handles.append(model.norm.register_forward_hook(lambda _, args, output: quantize_q8_roundtrip(output)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
