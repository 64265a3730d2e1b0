"""llama.cpp's per-tensor type mixes Q4_K_M and Q5_K_M for a Llama model.

A "Q4_K_M" file is not all Q4_K: ``llama_tensor_get_type`` (llama.cpp's llama-quant.cpp) picks
each tensor's type by its role and layer. For a Llama model (no experts):

- 1-D tensors (norms) stay F32.
- The output projection, or the token embeddings when they serve as it (tied), is Q6_K, or
  Q8_0 when its rows are not a multiple of 256.
- ``attn_v`` and ``ffn_down`` get Q6_K on the "more bits" layers: the first and last eighth
  and every third layer between (``use_more_bits``); the other layers keep the base type
  (Q4_K or Q5_K), and Llama 2 70B's ``attn_v`` there is Q5_K instead of Q4_K.
- Everything else is the base type.
- Rows that are not a multiple of 256 values fall back: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0 (and F16 if not even a multiple of 32).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gguf import LlamaFileType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import Llama2Error

T = GGMLQuantizationType

MIXES: dict[str, tuple[T, LlamaFileType]] = {
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
}
"""Mix names -> (base type, llama.cpp's ``general.file_type``)."""

_FALLBACKS = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_SEVENTY_B_LAYERS = 80  # llama.cpp's LLM_TYPE_70B: a grouped-query Llama of 80 layers


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose sensitive tensors get more bits."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mixed_type(
    gguf_name: str, shape: Sequence[int], mix: str, n_layers: int, *, tied: bool, grouped_query: bool = False
) -> T:
    """The GGML type llama.cpp's `mix` stores tensor `gguf_name` in.

    Args:
        gguf_name: the tensor's GGUF name (``token_embd.weight``, ``blk.3.attn_v.weight``, ...).
        shape: its shape, rows last (torch order).
        mix: a key of `MIXES`.
        n_layers: the model's layers.
        tied: the token embeddings serve as the output projection (no ``output.weight``).
        grouped_query: fewer key/value heads than query heads (with 80 layers: Llama 2 70B).
    """
    if mix not in MIXES:
        raise Llama2Error(f"unknown quantization mix {mix!r} (choose from {', '.join(MIXES)})")
    if len(shape) < 2:
        return T.F32
    base = MIXES[mix][0]
    return _fallback(_preferred_type(gguf_name, shape[-1], base, n_layers, tied, grouped_query), shape[-1])


def _preferred_type(name: str, row: int, base: T, n_layers: int, tied: bool, grouped_query: bool) -> T:
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return T.Q8_0 if row % GGML_QUANT_SIZES[base][0] else T.Q6_K
    match = _LAYER.fullmatch(name)
    if match is None:
        return base
    layer, role = int(match.group(1)), match.group(2)
    more_bits = use_more_bits(layer, n_layers)
    if role == "attn_v.weight":
        if more_bits:
            return T.Q6_K
        return T.Q5_K if base == T.Q4_K and grouped_query and n_layers == _SEVENTY_B_LAYERS else base
    if role == "ffn_down.weight" and more_bits:
        return T.Q6_K
    return base


def _fallback(qtype: T, row: int) -> T:
    """llama.cpp's replacement for a type whose blocks do not divide the rows."""
    if row % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACKS.get(qtype, qtype)
    return qtype if row % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16
