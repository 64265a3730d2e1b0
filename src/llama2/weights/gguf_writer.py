"""Write GGUF files (llama.cpp's format) from canonical weights, one tensor at a time.

`gguf.GGUFWriter` writes the header, metadata and tensor table first (sizes are known
from shapes and types), then each tensor as it is read, converted and quantized, so a
conversion holds one tensor at a time. Quantization is `gguf.quants.quantize`, the
reference implementation that llama.cpp's own converter uses.

Per-tensor types follow llama.cpp: 1-D tensors (norms) stay F32; the requested type
applies to 2-D weights whose rows are a whole number of its blocks (others fall back to
F16); for Q4_0/Q4_1 files the output projection (or, with tied embeddings, the token
embeddings that serve as it) is kept at Q8_0 where llama.cpp would use Q6_K, which the
`gguf` package cannot produce. The mixes "q4_k_m" and "q5_k_m" choose each tensor's type
as llama.cpp does (`quant_mix`) and quantize K types with `kquants`, llama.cpp's bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFWriter, LlamaFileType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from ..config import ModelArgs
from ..errors import Llama2Error
from .checkpoint import LazyStateDict, TensorSpec, lazy
from .common import atomic_output, check_state_dict
from .dequant import tensor_nbytes
from .gguf import gguf_name
from .kquants import quantize
from .quant_mix import MIXES, mixed_type
from .tokenizer_files import gguf_tokenizer_metadata

T = GGMLQuantizationType

TENSOR_TYPES: dict[str, T | None] = {
    "auto": None,  # each tensor's own float type (F32, F16 or BF16)
    "f32": T.F32,
    "f16": T.F16,
    "bf16": T.BF16,
    "q8_0": T.Q8_0,
    "q4_0": T.Q4_0,
    "q4_1": T.Q4_1,
}
"""`--type` names -> GGML types a GGUF file can be written in."""

TYPE_CHOICES = (*TENSOR_TYPES, *MIXES)
"""Every `tensor_type` name: one type for all tensors, or one of llama.cpp's mixes (`quant_mix.MIXES`)."""

_FILE_TYPES = {
    T.F32: LlamaFileType.ALL_F32,
    T.F16: LlamaFileType.MOSTLY_F16,
    T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
}
_FLOAT_TYPES = {torch.float32: T.F32, torch.float16: T.F16, torch.bfloat16: T.BF16}
_QUANTIZED = frozenset({T.Q8_0, T.Q4_0, T.Q4_1})
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
_ARCH = "llama"


def write_gguf(
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    tensor_type: str = "auto",
    tokenizer=None,
    tokenizer_metadata: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    name: str | None = None,
) -> Path:
    """Write a GGUF file of a Llama model that llama.cpp loads.

    The file is written under a temporary name and renamed into place when complete.

    Args:
        args: the architecture.
        state_dict: canonical weights matching `args` (a dict or a `LazyStateDict`).
        path: the ``.gguf`` file to write.
        tensor_type: one of `TYPE_CHOICES` (see the module docstring for the
            per-tensor choice).
        tokenizer: a `llama2.tokenizer.Tokenizer` to describe in the metadata.
        tokenizer_metadata: ``tokenizer.*`` keys to write as they are (from a GGUF
            source); they win over `tokenizer`.
        chat_template: the chat template to write (default: the tokenizer's).
        name: ``general.name``.

    Returns:
        The path.

    Raises:
        Llama2Error: an unknown `tensor_type`, a state dict that does not match `args`, or
            a vocabulary whose size differs from the embeddings'.
    """
    path = Path(path)
    if tensor_type not in TYPE_CHOICES:
        raise Llama2Error(f"unknown GGUF tensor type {tensor_type!r} (choose from {', '.join(TYPE_CHOICES)})")
    tensors = lazy(state_dict)
    check_state_dict(tensors, args, "state dict")
    types = tensor_types(args, tensors, tensor_type)
    file_type = MIXES[tensor_type][1] if tensor_type in MIXES else _file_type(types)
    if tokenizer_metadata is None and tokenizer is not None:
        tokenizer_metadata = gguf_tokenizer_metadata(tokenizer, chat_template)
    metadata = {**model_metadata(args, file_type, name), **_checked_vocabulary(tokenizer_metadata, args, path)}
    with atomic_output(path) as temp:
        _write(temp, metadata, tensors, types)
    return path


def tensor_types(args: ModelArgs, tensors: LazyStateDict, tensor_type: str) -> dict[str, T]:
    """Canonical name -> the GGML type it is written in, for `tensor_type` (one of `TYPE_CHOICES`)."""
    tied = args.tie_word_embeddings
    if tensor_type in MIXES:
        options = dict(tied=tied, grouped_query=args.n_kv_heads != args.n_heads)
        layers = args.n_layers
        return {n: mixed_type(gguf_name(n), tensors.spec(n).shape, tensor_type, layers, **options) for n in tensors}
    return {n: choose_type(n, tensors.spec(n), TENSOR_TYPES[tensor_type], tied) for n in tensors}


def choose_type(name: str, spec: TensorSpec, requested: T | None, tied: bool) -> T:
    """The GGML type canonical tensor `name` is stored in when `requested` is asked for (None: its own)."""
    if len(spec.shape) < 2:
        return T.F32
    if requested is None:
        return _FLOAT_TYPES.get(spec.dtype, T.F32)
    output = name == "output.weight" or (tied and name == "tok_embeddings.weight")
    if requested in (T.Q4_0, T.Q4_1) and output:
        requested = T.Q8_0
    if spec.shape[-1] % GGML_QUANT_SIZES[requested][0]:
        return T.F16
    return requested


def encode(tensor: torch.Tensor, qtype: T) -> np.ndarray:
    """`tensor`'s data in GGML type `qtype`, by `kquants.quantize` (uint8 blocks for quantized types)."""
    return quantize(tensor.detach().cpu().float().numpy(), qtype)


def model_metadata(args: ModelArgs, file_type: LlamaFileType, name: str | None = None) -> dict[str, Any]:
    """The ``general.*`` and ``llama.*`` keys describing `args` (``general.architecture`` aside)."""
    values = {
        Keys.LLM.CONTEXT_LENGTH: args.max_seq_len,
        Keys.LLM.EMBEDDING_LENGTH: args.dim,
        Keys.LLM.BLOCK_COUNT: args.n_layers,
        Keys.LLM.FEED_FORWARD_LENGTH: args.hidden_dim,
        Keys.Rope.DIMENSION_COUNT: args.head_dim,
        Keys.Attention.HEAD_COUNT: args.n_heads,
        Keys.Attention.HEAD_COUNT_KV: args.n_kv_heads,
        Keys.Attention.LAYERNORM_RMS_EPS: float(args.norm_eps),
        Keys.Rope.FREQ_BASE: float(args.rope_theta),
        Keys.LLM.VOCAB_SIZE: args.vocab_size,
    }
    metadata: dict[str, Any] = {
        Keys.General.NAME: name or "llama",
        Keys.General.FILE_TYPE: int(file_type),
        **{template.format(arch=_ARCH): value for template, value in values.items()},
    }
    if file_type in {_FILE_TYPES[t] for t in _QUANTIZED} | {file_type for _, file_type in MIXES.values()}:
        metadata[Keys.General.QUANTIZATION_VERSION] = _QUANTIZATION_VERSION
    return metadata


def _file_type(types: Mapping[str, T]) -> LlamaFileType:
    """llama.cpp's file type: that of the 2-D weights' most common storage type."""
    counts: dict[T, int] = {}
    for qtype in types.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    weights = {qtype: n for qtype, n in counts.items() if qtype != T.F32} or counts
    return _FILE_TYPES[max(weights, key=weights.__getitem__)]


def _checked_vocabulary(metadata: Mapping[str, Any] | None, args: ModelArgs, path: Path) -> dict[str, Any]:
    """`metadata` after checking its token list matches the embeddings (llama.cpp requires it)."""
    if not metadata:
        return {}
    tokens = metadata.get(Keys.Tokenizer.LIST) or []
    if len(tokens) != args.vocab_size:
        raise Llama2Error(
            f"{path}: the tokenizer has {len(tokens)} tokens but the model has {args.vocab_size} embeddings; "
            "llama.cpp needs them equal"
        )
    return dict(metadata)


def _write(path: Path, metadata: Mapping[str, Any], tensors: LazyStateDict, types: Mapping[str, T]) -> None:
    writer = GGUFWriter(path, _ARCH)
    try:
        for key, value in metadata.items():
            _add_value(writer, key, value)
        for name in tensors:
            shape = tensors.spec(name).shape
            writer.add_tensor_info(
                gguf_name(name), shape, np.dtype(np.float32), tensor_nbytes(types[name], shape), raw_dtype=types[name]
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in tensors:
            writer.write_tensor_data(encode(tensors[name], types[name]))
    finally:
        writer.close()


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    """Add a plain python value with the GGUF type llama.cpp expects for it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if 0 <= value < 2**32 else writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise Llama2Error(f"cannot write metadata {key} of type {type(value).__name__} to GGUF")
