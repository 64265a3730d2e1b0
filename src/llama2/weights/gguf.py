"""Read GGUF checkpoints (llama.cpp's format) of Llama-architecture models.

The header (metadata and tensor table) is parsed by the bounds-checked reader of
`llama2.weights.gguf_header`, which keeps only plain Python values. Each tensor's bytes
are then read with plain file reads and decoded with `llama2.weights.dequant`, one
tensor at a time, so reading needs about the final state dict plus one tensor of memory
(and `open_gguf` only one tensor). GGUF llama tensors are already in Meta's interleaved
RoPE layout (llama.cpp's converter permutes Hugging Face q/k), so names are mapped and
nothing is permuted.
"""

from __future__ import annotations

import os
import re
from itertools import islice
from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType, Keys

from ..config import ModelArgs
from ..errors import Llama2Error
from .checkpoint import Checkpoint, LazyStateDict, TensorSpec, iter_expected_shapes, materialize
from .common import check_dtype, describe_names
from .dequant import dequantize
from .gguf_header import TensorInfo, read_gguf_metadata, read_header

__all__ = [
    "ARCHITECTURES",
    "GGUFStateDict",
    "canonical_name",
    "gguf_name",
    "open_gguf",
    "read_gguf",
    "read_gguf_metadata",
]

# Storage types read as themselves; every other type is dequantized to float32.
_PLAIN_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}

ARCHITECTURES = frozenset({"llama"})
"""`general.architecture` values read here (same tensors and hyperparameters as Llama)."""

_GLOBAL_TENSORS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_TENSORS = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF_LAYER = re.compile(r"blk\.(0|[1-9][0-9]*)\.(.+)")
_CANONICAL_LAYER = re.compile(r"layers\.([0-9]+)\.(.+)")

_MISSING = object()


# ---------------------------------------------------------------------------
# Public API


def read_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a GGUF Llama checkpoint into the canonical naming.

    Args:
        path: the ``.gguf`` file.
        dtype: floating dtype of the returned weights (quantized types are decoded to
            float32 first, then cast).
        device: where the weights are decoded and returned.

    Returns:
        A `Checkpoint` with ``format="gguf"``. ``tokenizer_metadata`` holds every
        ``tokenizer.*`` key (None when there are none).

    Raises:
        Llama2Error: the file is missing, is not a valid GGUF file, is not a supported
            Llama-architecture model, or its tensors contradict its metadata.
    """
    check_dtype(dtype, os.fspath(path))
    return materialize(open_gguf(path, device), dtype, device)


def open_gguf(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Open a GGUF Llama checkpoint lazily: like `read_gguf`, but a tensor is read and decoded when looked up.

    F32, F16 and BF16 tensors come back in their own dtype (exactly); quantized ones as
    float32. The header, metadata and every tensor's shape are checked first.

    Args:
        path: the ``.gguf`` file.
        device: where tensors are decoded.
    """
    source = os.fspath(path)
    meta, infos = read_header(source)
    arch = _architecture(meta, source)
    shapes = _tensor_shapes(infos, source)
    args = _model_args(meta, arch, shapes, source)
    _check_supported(meta, arch, args, source)
    _check_tensor_shapes(shapes, args, source)
    tensors = {canonical_name(t.name): t for t in infos}
    specs = {name: TensorSpec(shapes[t.name], _PLAIN_TYPES.get(t.qtype, torch.float32)) for name, t in tensors.items()}

    def load(name: str) -> torch.Tensor:
        return _load_tensor(tensors[name], specs[name].shape, torch.device(device), source)

    def read_raw(name: str) -> torch.Tensor:
        return _read_bytes(source, tensors[name])

    return Checkpoint(
        args=args,
        state_dict=GGUFStateDict(specs, load, source, read_raw),
        tokenizer_metadata={k: v for k, v in meta.items() if k.startswith("tokenizer.")} or None,
        chat_template=_optional_str(meta, Keys.Tokenizer.CHAT_TEMPLATE, source),
        source=source,
        format="gguf",
        tensor_types={name: t.qtype.name for name, t in tensors.items()},
        metadata=_scalar_metadata(meta),
    )


class GGUFStateDict(LazyStateDict):
    """A lazy GGUF state dict that also hands out a tensor's stored bytes undecoded.

    `read_raw(name)` returns the uint8 block bytes of a tensor (its GGML type is
    `Checkpoint.tensor_types[name]`), so quantized blocks can be packed for compute
    without a detour through float32.
    """

    def __init__(self, specs, load, source: str, read_raw):
        super().__init__(specs, load, source)
        self.read_raw = read_raw


def canonical_name(name: str) -> str | None:
    """Meta's name for a GGUF llama tensor name, or None if it is not one."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _GGUF_LAYER.fullmatch(name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None


def gguf_name(canonical: str) -> str:
    """GGUF's name for one of Meta's tensor names (the inverse of `canonical_name`)."""
    for theirs, ours in _GLOBAL_TENSORS.items():
        if ours == canonical:
            return theirs
    match = _CANONICAL_LAYER.fullmatch(canonical)
    if match:
        for theirs, ours in _LAYER_TENSORS.items():
            if ours == match.group(2):
                return f"blk.{match.group(1)}.{theirs}"
    raise Llama2Error(f"{canonical!r} is not a Llama weight name")


# ---------------------------------------------------------------------------
# Metadata


def _scalar_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Scalar fields other than the tokenizer's and the reader's GGUF.* pseudo-fields."""
    return {
        key: value
        for key, value in meta.items()
        if not key.startswith(("tokenizer.", "GGUF.")) and isinstance(value, (str, int, float, bool))
    }


def _required(meta: dict[str, Any], key: str, path: str, default: Any = _MISSING) -> Any:
    """`meta[key]` (or `default` when given), raising `Llama2Error` when the key is missing."""
    value = meta.get(key, default)
    if value is _MISSING:
        raise Llama2Error(f"{path}: missing metadata key {key}")
    return value


def _architecture(meta: dict[str, Any], path: str) -> str:
    arch = _required(meta, Keys.General.ARCHITECTURE, path)
    if arch not in ARCHITECTURES:
        raise Llama2Error(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return arch


def _int_key(meta: dict[str, Any], key: str, path: str, default: Any = _MISSING) -> int:
    value = _required(meta, key, path, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Llama2Error(f"{path}: metadata {key} must be an integer, got {value!r}")
    return value


def _float_key(meta: dict[str, Any], key: str, path: str, default: Any = _MISSING) -> float:
    value = _required(meta, key, path, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Llama2Error(f"{path}: metadata {key} must be a number, got {value!r}")
    return float(value)


def _optional_str(meta: dict[str, Any], key: str, path: str) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise Llama2Error(f"{path}: metadata {key} must be a string, got {type(value).__name__}")
    return value


def _vocab_size(meta: dict[str, Any], arch: str, shapes: dict[str, tuple[int, ...]], path: str) -> int:
    """From ``{arch}.vocab_size``, else the token list, else the embedding's rows."""
    key = Keys.LLM.VOCAB_SIZE.format(arch=arch)
    if key in meta:
        return _int_key(meta, key, path)
    tokens = meta.get(Keys.Tokenizer.LIST)
    if isinstance(tokens, list):
        return len(tokens)
    embedding = shapes.get("token_embd.weight")
    if embedding:
        return embedding[0]
    raise Llama2Error(f"{path}: cannot tell the vocabulary size: no {key}, token list or token_embd.weight")


def _model_args(meta: dict[str, Any], arch: str, shapes: dict[str, tuple[int, ...]], path: str) -> ModelArgs:
    def key(template: str) -> str:
        return template.format(arch=arch)

    n_heads = _int_key(meta, key(Keys.Attention.HEAD_COUNT), path)
    fields = dict(
        dim=_int_key(meta, key(Keys.LLM.EMBEDDING_LENGTH), path),
        n_layers=_int_key(meta, key(Keys.LLM.BLOCK_COUNT), path),
        n_heads=n_heads,
        n_kv_heads=_int_key(meta, key(Keys.Attention.HEAD_COUNT_KV), path, default=n_heads),
        hidden_dim=_int_key(meta, key(Keys.LLM.FEED_FORWARD_LENGTH), path),
        vocab_size=_vocab_size(meta, arch, shapes, path),
        norm_eps=_float_key(meta, key(Keys.Attention.LAYERNORM_RMS_EPS), path),
        rope_theta=_float_key(meta, key(Keys.Rope.FREQ_BASE), path, default=10000.0),
        max_seq_len=_int_key(meta, key(Keys.LLM.CONTEXT_LENGTH), path),
        tie_word_embeddings="output.weight" not in shapes,
    )
    try:
        return ModelArgs(**fields)
    except Llama2Error as exc:
        raise Llama2Error(f"{path}: {exc}") from None


def _check_supported(meta: dict[str, Any], arch: str, args: ModelArgs, path: str) -> None:
    """Reject features the model does not implement, rather than run them wrongly."""
    scaling_type = Keys.Rope.SCALING_TYPE.format(arch=arch)
    scaling = meta.get(scaling_type, "none")
    if scaling != "none":
        raise Llama2Error(f"{path}: unsupported RoPE scaling type {scaling!r} ({scaling_type})")
    # rope.scale_linear: the older files' name of the factor (gguf.constants has no key for it).
    for key in (Keys.Rope.SCALING_FACTOR.format(arch=arch), f"{arch}.rope.scale_linear"):
        factor = meta.get(key, 1.0)
        if factor not in (0.0, 1.0):
            raise Llama2Error(f"{path}: unsupported RoPE scaling factor {factor!r} ({key})")
    for template in (Keys.Rope.DIMENSION_COUNT, Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH):
        key = template.format(arch=arch)
        size = meta.get(key, args.head_dim)
        if size != args.head_dim:
            raise Llama2Error(f"{path}: unsupported {key} = {size!r}: only head_dim {args.head_dim} is supported")
    expert_count = Keys.LLM.EXPERT_COUNT.format(arch=arch)
    experts = meta.get(expert_count, 0)
    if experts:
        raise Llama2Error(f"{path}: unsupported mixture-of-experts model ({expert_count} = {experts!r})")


# ---------------------------------------------------------------------------
# Tensors


def _tensor_shapes(infos: list[TensorInfo], path: str) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> torch shape, after checking every name is a Llama weight."""
    if any(t.name == "rope_freqs.weight" for t in infos):
        raise Llama2Error(f"{path}: unsupported RoPE frequency scaling (tensor rope_freqs.weight)")
    unknown = [t.name for t in infos if canonical_name(t.name) is None]
    if unknown:
        raise Llama2Error(f"{path}: unknown tensors {describe_names(unknown)} (not a plain Llama model?)")
    return {t.name: tuple(reversed(t.dims)) for t in infos}  # GGUF lists dims reversed


def _check_tensor_shapes(shapes: dict[str, tuple[int, ...]], args: ModelArgs, path: str) -> None:
    """Check the file holds exactly the model's tensors, each in its expected shape."""
    canonical = {canonical_name(name): name for name in shapes}
    extra = [name for name in shapes if _layer_index(name) >= args.n_layers]
    if extra:
        raise Llama2Error(f"{path}: tensors {describe_names(extra)} do not belong to a {args.n_layers}-layer model")
    n_expected = 2 + (not args.tie_word_embeddings) + len(_LAYER_TENSORS) * args.n_layers
    if len(shapes) < n_expected:
        # Lazy: the first few missing names only, however many layers the metadata claims.
        missing = (gguf_name(name) for name, _ in iter_expected_shapes(args) if name not in canonical)
        shown = ", ".join(islice(missing, 5))
        raise Llama2Error(f"{path}: missing {n_expected - len(shapes)} tensors: {shown}")
    for name, want in iter_expected_shapes(args):
        shape = shapes[canonical[name]]
        if shape != want:
            raise Llama2Error(
                f"{path}: tensor {canonical[name]} has shape {list(shape)}, expected {list(want)} from the metadata"
            )


def _layer_index(gguf_tensor: str) -> int:
    """The block number of a ``blk.N.*`` tensor name, -1 for the others."""
    match = _GGUF_LAYER.fullmatch(gguf_tensor)
    return int(match.group(1)) if match else -1


def _load_tensor(tensor: TensorInfo, shape: tuple[int, ...], device: torch.device, path: str) -> torch.Tensor:
    """Read one tensor's bytes from the file and decode them on `device` (plain types keep their dtype)."""
    raw = _read_bytes(path, tensor)
    plain = _PLAIN_TYPES.get(tensor.qtype)
    if plain is not None:
        return raw.view(plain).reshape(shape).to(device)
    try:
        return dequantize(raw.to(device), tensor.qtype, shape)
    except Llama2Error as exc:
        raise Llama2Error(f"{path}: tensor {tensor.name}: {exc}") from None


def _read_bytes(path: str, tensor: TensorInfo) -> torch.Tensor:
    """The tensor's bytes, read into new memory (the header scan proved they lie inside the file)."""
    buffer = np.empty(int(tensor.n_bytes), dtype=np.uint8)
    with open(path, "rb") as file:
        file.seek(int(tensor.data_offset))
        got = file.readinto(memoryview(buffer))
    if got != buffer.size:
        raise Llama2Error(f"{path}: tensor {tensor.name} is cut short (the file changed while reading)")
    return torch.from_numpy(buffer)
