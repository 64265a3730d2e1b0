"""Hugging Face Llama folders: `config.json` plus safetensors (or PyTorch `.bin`) weights.

Hugging Face renames every tensor and permutes the rows of the query and key projections
so that its rotate-half RoPE matches Meta's interleaved one. This reader maps the names
back and undoes the permutation, so the result is in the canonical (Meta) layout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelArgs
from ..errors import Llama2Error
from .checkpoint import Checkpoint, expected_shapes
from .common import (
    build_args,
    check_tensor,
    describe_names,
    dtype_name,
    load_torch_file,
    read_folder_config,
    read_json,
)

CONFIG_FILE = "config.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# (single file, index of shards) pairs, in order of preference.
WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)

# Hugging Face module names -> canonical ones, outside and inside `model.layers.N.`.
TOP_LEVEL_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_PATTERN = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some checkpoints carry that are not weights.
_DROPPED_LAYER_TENSORS = frozenset({"self_attn.rotary_emb.inv_freq"})

# Canonical modules whose rows Hugging Face permuted, and the ModelArgs field giving their head count.
_ROPE_PERMUTED_HEADS = {"wq": "n_heads", "wk": "n_kv_heads"}

_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0}


def read_hf(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> Checkpoint:
    """Read a Hugging Face Llama (or Mistral-layout) model folder.

    Weights come from `model.safetensors`, a sharded `model.safetensors.index.json`, or
    the PyTorch equivalents, read tensor by tensor from memory-mapped files.

    Args:
        folder: the model folder (as written by `save_pretrained`).
        dtype: floating-point type of the returned weights.
        device: device of the returned weights.

    Returns:
        A `Checkpoint` with canonical names, Meta's RoPE layout and `format="hf"`.
        Without `lm_head.weight` (or with `tie_word_embeddings`) the embeddings are tied.

    Raises:
        Llama2Error: missing or corrupt files, an unsupported architecture, or tensors
            missing, unexpected or shaped differently from what `config.json` implies.
    """
    folder = Path(folder)
    config_path, config = read_folder_config(folder, CONFIG_FILE, dtype, "a Hugging Face model")
    locations = tensor_locations(folder)
    args = args_from_hf_config(config, config_path, has_lm_head="lm_head.weight" in locations)
    state_dict, tensor_types = _load_tensors(locations, args, dtype, device)
    missing = [name for name in expected_shapes(args) if name not in state_dict]
    if missing:
        raise Llama2Error(f"{folder}: missing tensor(s) {describe_names(missing)}")
    return Checkpoint(
        args=args,
        state_dict=state_dict,
        tokenizer_metadata=None,
        chat_template=read_chat_template(folder),
        source=str(folder),
        format="hf",
        tensor_types=tensor_types,
        metadata={"config": config, "tokenizer_path": _tokenizer_path(folder)},
    )


def _load_tensors(
    locations: dict[str, _WeightFile], args: ModelArgs, dtype: torch.dtype, device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical state dict and storage types, one tensor at a time, each checked against `args`."""
    expected = expected_shapes(args)
    state_dict: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, str] = {}
    for hf_name, file in locations.items():
        name = canonical_name(hf_name, file.path)
        if name is None or (name == "output.weight" and args.tie_word_embeddings):
            continue  # a dropped buffer, or the redundant lm_head of a tied model
        tensor = file.load(hf_name)
        check_tensor(name, tensor, expected, str(file.path), label=f"{hf_name} ({name})")
        state_dict[name] = to_meta_layout(name, tensor, args).to(device=device, dtype=dtype)
        tensor_types[name] = file.dtype(hf_name)
    return state_dict, tensor_types


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------


def args_from_hf_config(config: dict, path: Path, has_lm_head: bool = True) -> ModelArgs:
    """`ModelArgs` from a Hugging Face Llama `config.json` (as a dict).

    Args:
        config: the parsed config.
        path: the config's path, for error messages.
        has_lm_head: whether the weights include `lm_head.weight`; without it the
            embeddings are tied whatever the config says.

    Raises:
        Llama2Error: a missing key or a feature this model does not implement.
    """
    _check_supported(config, path)
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    absent = [key for key in required if key not in config]
    if absent:
        raise Llama2Error(f"{path}: missing {', '.join(absent)}")
    args = build_args(
        dict(
            dim=config["hidden_size"],
            hidden_dim=config["intermediate_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"],
            norm_eps=_number(config, "rms_norm_eps", path),
            rope_theta=_rope_theta(config, path),
            max_seq_len=_context_length(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)) or not has_lm_head,
        ),
        path,
    )
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != args.head_dim:
        raise Llama2Error(
            f"{path}: head_dim {head_dim} differs from hidden_size / num_attention_heads = {args.head_dim}"
            " (not supported)"
        )
    return args


def _check_supported(config: dict, path: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        expected = ", ".join(SUPPORTED_MODEL_TYPES)
        raise Llama2Error(f"{path}: model_type {model_type!r} is not supported (expected one of {expected})")
    if config.get("hidden_act", "silu") != "silu":
        raise Llama2Error(f"{path}: hidden_act {config['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise Llama2Error(f"{path}: {key} is not supported (Llama layers have no biases)")


def _rope_theta(config: dict, path: Path) -> float:
    """The RoPE base, from transformers 5's `rope_parameters` or the older top-level keys."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, rope in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        if not isinstance(rope, dict):
            raise Llama2Error(f"{path}: {key} must be an object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise Llama2Error(f"{path}: RoPE type {kind!r} in {key} is not supported (only default)")
    theta = parameters.get("rope_theta", config.get("rope_theta", _DEFAULTS["rope_theta"]))
    return _as_float(theta, "rope_theta", path)


def _number(config: dict, key: str, path: Path) -> float:
    return _as_float(config.get(key, _DEFAULTS[key]), key, path)


def _as_float(value, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Llama2Error(f"{path}: {key} must be a number, got {value!r}")
    return float(value)


def _context_length(config: dict) -> int:
    """max_position_embeddings, capped at a sliding window (attention beyond it would differ)."""
    length = config.get("max_position_embeddings", _DEFAULTS["max_position_embeddings"])
    window = config.get("sliding_window")
    return min(length, window) if isinstance(window, int) and window > 0 else length


# ---------------------------------------------------------------------------------------
# Names and layout
# ---------------------------------------------------------------------------------------


def canonical_name(hf_name: str, path: Path) -> str | None:
    """The canonical name of Hugging Face tensor `hf_name`; None for tensors to drop.

    Raises:
        Llama2Error: a name this reader does not know (reported against `path`).
    """
    module = hf_name.removesuffix(".weight")
    if module in TOP_LEVEL_NAMES and hf_name.endswith(".weight"):
        return f"{TOP_LEVEL_NAMES[module]}.weight"
    match = _LAYER_PATTERN.fullmatch(hf_name)
    if match:
        layer, rest = match.groups()
        if rest in _DROPPED_LAYER_TENSORS:
            return None
        inner = rest.removesuffix(".weight")
        if inner in LAYER_NAMES and rest.endswith(".weight"):
            return f"layers.{int(layer)}.{LAYER_NAMES[inner]}.weight"
    raise Llama2Error(f"{path}: unexpected tensor {hf_name}")


def to_meta_layout(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Undo Hugging Face's rotate-half row permutation for q/k projections; other tensors pass through."""
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if module not in _ROPE_PERMUTED_HEADS:
        return tensor
    n_heads = getattr(args, _ROPE_PERMUTED_HEADS[module])
    out_dim, dim = tensor.shape
    half = out_dim // n_heads // 2
    # HF rows per head: [all real parts; all imaginary parts] -> Meta's interleaved pairs.
    return tensor.view(n_heads, 2, half, dim).transpose(1, 2).reshape(out_dim, dim)  # [out_dim, dim]


# ---------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------


class _SafetensorsFile:
    """One memory-mapped safetensors file, read tensor by tensor."""

    def __init__(self, path: Path):
        self.path = path
        _check_safetensors_header(path)
        try:
            self._handle = safe_open(str(path), framework="pt")
            self._names = list(self._handle.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise Llama2Error(f"{path}: corrupt safetensors file ({error})") from error

    def names(self) -> list[str]:
        return self._names

    def dtype(self, name: str) -> str:
        return self._handle.get_slice(name).get_dtype()

    def load(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as error:
            raise Llama2Error(f"{self.path}: cannot read tensor {name} ({error})") from error


class _TorchFile:
    """One `pytorch_model*.bin` file (loaded with `weights_only`, memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors = load_torch_file(path)

    def names(self) -> list[str]:
        return list(self._tensors)

    def dtype(self, name: str) -> str:
        return dtype_name(self._tensors[name].dtype)

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _check_safetensors_header(path: Path) -> None:
    """Reject a file whose 8-byte header length cannot fit (before safetensors allocates for it)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
    if len(prefix) < 8:
        raise Llama2Error(f"{path}: truncated safetensors file ({size} bytes)")
    header_len = int.from_bytes(prefix, "little")
    if header_len > size - 8:
        raise Llama2Error(f"{path}: corrupt safetensors file (header length {header_len} exceeds file size {size})")


_WeightFile = _SafetensorsFile | _TorchFile


def _open_weight_file(path: Path) -> _WeightFile:
    if not path.is_file():
        raise Llama2Error(f"{path}: no such weight file")
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def tensor_locations(folder: Path) -> dict[str, _WeightFile]:
    """Hugging Face tensor name -> the opened weight file holding it.

    Raises:
        Llama2Error: no weight files, an index naming a missing shard or a tensor its
            shard does not hold, or an unreadable file.
    """
    for single, index in WEIGHT_LAYOUTS:
        if (folder / single).is_file():
            file = _open_weight_file(folder / single)
            return {name: file for name in file.names()}
        if (folder / index).is_file():
            return _indexed_locations(folder / index)
    expected = " or ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
    raise Llama2Error(f"{folder}: no weight files (expected {expected})")


def _indexed_locations(index_path: Path) -> dict[str, _WeightFile]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise Llama2Error(f"{index_path}: no weight_map")
    shards = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = index_path.parent / str(shard_name)
        if not shard_path.is_file():
            raise Llama2Error(f"{index_path}: names shard {shard_name}, which does not exist")
        shards[shard_name] = _open_weight_file(shard_path)
    for name, shard_name in weight_map.items():
        if name not in shards[shard_name].names():
            raise Llama2Error(f"{shards[shard_name].path}: missing tensor {name} (listed in {index_path.name})")
    return {name: shards[shard_name] for name, shard_name in weight_map.items()}


# ---------------------------------------------------------------------------------------
# Tokenizer-side files
# ---------------------------------------------------------------------------------------


def read_chat_template(folder: Path) -> str | None:
    """The chat template the folder ships (see `llama2.tokenizer.read_tokenizer_config`)."""
    from ..tokenizer import read_tokenizer_config

    return read_tokenizer_config(folder)["chat_template"]


def _tokenizer_path(folder: Path) -> str | None:
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return None
