"""Join the projections that read the same input into one matmul (inference, after loading).

wq, wk and wv become one `wqkv`; w1 and w3 one `w13`. A decode step then makes 4 weight
calls per layer instead of 7, each over more output rows (the per-call cost of small
matmuls dominates small models). Layers of different kinds (say a GGUF file with Q8_0
values next to Q4_0 queries) or kinds without a `concat` stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .model import Transformer


def concat_linear(layers: Sequence[nn.Linear]) -> nn.Linear:
    """A bias-free linear layer computing `layers`' outputs side by side."""
    weight = torch.cat([layer.weight.detach() for layer in layers])  # [sum of out, in]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def concat_layers(layers: Sequence[nn.Module]) -> nn.Module | None:
    """One layer computing `layers`' outputs side by side, or None when they cannot be joined."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is nn.Linear:
        return None if any(layer.bias is not None for layer in layers) else concat_linear(layers)
    concat = getattr(kind, "concat", None)
    return concat(layers) if concat is not None else None


def fuse_projections(model: Transformer) -> Transformer:
    """Join each block's q/k/v and gate/up projections where their kinds allow, in place."""
    for block in model.layers:
        attention, feed_forward = block.attention, block.feed_forward
        wqkv = concat_layers([attention.wq, attention.wk, attention.wv])
        if wqkv is not None:
            del attention.wq, attention.wk, attention.wv
            attention.wqkv = wqkv
        w13 = concat_layers([feed_forward.w1, feed_forward.w3])
        if w13 is not None:
            del feed_forward.w1, feed_forward.w3
            feed_forward.w13 = w13
    return model
