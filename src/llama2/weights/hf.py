"""Hugging Face Llama folders: `config.json` plus safetensors (or PyTorch `.bin`) weights.

Hugging Face renames every tensor and permutes the rows of the query and key projections
so that its rotate-half RoPE matches Meta's interleaved one. The reader maps the names
back and undoes the permutation, so the result is in the canonical (Meta) layout; the
writer does the reverse, streaming tensors into size-limited safetensors shards.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import Llama2Error
from .checkpoint import Checkpoint, LazyStateDict, TensorSpec, expected_shapes, lazy, materialize
from .common import (
    atomic_folder,
    build_args,
    check_dtype,
    check_spec,
    check_state_dict,
    describe_names,
    dtype_name,
    load_torch_file,
    read_folder_config,
    read_json,
    write_json,
)
from .safetensors_file import SafetensorsFile, SafetensorsWriter, data_size
from .tokenizer_files import find_tokenizer_file, read_tokenizer_config, special_token_ids, write_hf_tokenizer

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
    the PyTorch equivalents, read tensor by tensor.

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
    check_dtype(dtype, Path(folder))
    return materialize(open_hf(folder), dtype, device)


def open_hf(folder: str | os.PathLike) -> Checkpoint:
    """Open a Hugging Face model folder lazily: like `read_hf`, but nothing is read until looked up.

    The returned `state_dict` is a `LazyStateDict` in the files' own dtypes; every
    header, name and shape is checked before it is returned.
    """
    folder = Path(folder)
    config_path, config = read_folder_config(folder, CONFIG_FILE, "a Hugging Face model")
    locations = tensor_locations(folder)
    args = args_from_hf_config(config, config_path, has_lm_head="lm_head.weight" in locations)
    names = _canonical_names(locations, args)
    missing = [name for name in expected_shapes(args) if name not in names]
    if missing:
        raise Llama2Error(f"{folder}: missing tensor(s) {describe_names(missing)}")

    def load(name: str) -> torch.Tensor:
        hf = names[name]
        return to_meta_layout(name, locations[hf].load(hf), args)

    return Checkpoint(
        args=args,
        state_dict=LazyStateDict({name: locations[hf].spec(hf) for name, hf in names.items()}, load, str(folder)),
        tokenizer_metadata=None,
        chat_template=read_chat_template(folder),
        source=str(folder),
        format="hf",
        tensor_types={name: locations[hf].dtype(hf) for name, hf in names.items()},
        metadata={"config": config, "tokenizer_path": _tokenizer_path(folder)},
    )


def _canonical_names(locations: dict[str, _WeightFile], args: ModelArgs) -> dict[str, str]:
    """Canonical name -> Hugging Face name of every weight, each checked against `args`."""
    expected = expected_shapes(args)
    names: dict[str, str] = {}
    for theirs, file in locations.items():
        name = canonical_name(theirs, file.path)
        if name is None or (name == "output.weight" and args.tie_word_embeddings):
            continue  # a dropped buffer, or the redundant lm_head of a tied model
        check_spec(name, file.spec(theirs), expected, str(file.path), label=f"{theirs} ({name})")
        names[name] = theirs
    return names


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


def hf_name(name: str) -> str:
    """The Hugging Face name of canonical tensor `name` (the inverse of `canonical_name`)."""
    module = name.removesuffix(".weight")
    for theirs, ours in TOP_LEVEL_NAMES.items():
        if ours == module:
            return f"{theirs}.weight"
    layer, _, inner = module.removeprefix("layers.").partition(".")
    for theirs, ours in LAYER_NAMES.items():
        if ours == inner and layer.isdigit():
            return f"model.layers.{layer}.{theirs}.weight"
    raise Llama2Error(f"{name!r} is not a Llama weight name")


def to_meta_layout(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Undo Hugging Face's rotate-half row permutation for q/k projections; other tensors pass through."""
    return _permute_rope_rows(name, tensor, args, to_hf=False)


def to_hf_layout(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Apply Hugging Face's rotate-half row permutation to q/k projections (the inverse of `to_meta_layout`)."""
    return _permute_rope_rows(name, tensor, args, to_hf=True)


def _permute_rope_rows(name: str, tensor: torch.Tensor, args: ModelArgs, to_hf: bool) -> torch.Tensor:
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if module not in _ROPE_PERMUTED_HEADS:
        return tensor
    n_heads = getattr(args, _ROPE_PERMUTED_HEADS[module])
    out_dim, dim = tensor.shape
    half = out_dim // n_heads // 2
    # Rows per head: Meta interleaves (real, imaginary) pairs, HF puts all real parts first.
    pairs_first = (n_heads, half, 2, dim) if to_hf else (n_heads, 2, half, dim)
    return tensor.reshape(pairs_first).transpose(1, 2).reshape(out_dim, dim)  # [out_dim, dim]


# ---------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------


class _TorchFile:
    """One `pytorch_model*.bin` file (loaded with `weights_only`, memory-mapped)."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors = load_torch_file(path)

    def names(self) -> list[str]:
        return list(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        tensor = self._tensors[name]
        return TensorSpec(tuple(tensor.shape), tensor.dtype)

    def dtype(self, name: str) -> str:
        return dtype_name(self._tensors[name].dtype)

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]


_WeightFile = SafetensorsFile | _TorchFile


def _open_weight_file(path: Path) -> _WeightFile:
    if not path.is_file():
        raise Llama2Error(f"{path}: no such weight file")
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


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
    """The chat template the folder ships (see `tokenizer_files.read_tokenizer_config`)."""
    return read_tokenizer_config(folder)["chat_template"]


def _tokenizer_path(folder: Path) -> str | None:
    found = find_tokenizer_file(folder)
    return None if found is None else str(found)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default ("5GB")
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def write_hf(
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    chat_template: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face Llama folder that `transformers.AutoModelForCausalLM` loads.

    Tensors are renamed, q/k rows permuted for Hugging Face's rotate-half RoPE, and
    streamed one at a time into safetensors shards of at most `max_shard_bytes` (one
    shard is `model.safetensors`; more get `model.safetensors.index.json`). The folder
    is built under a temporary name and renamed into place when complete, replacing any
    previous `folder`.

    Args:
        args: the architecture.
        state_dict: canonical weights matching `args` (a dict or a `LazyStateDict`).
        folder: the destination folder.
        tokenizer: a `llama2.tokenizer.Tokenizer` to write beside the weights (see
            `tokenizer_files.write_hf_tokenizer`); None writes weights and configs only.
        chat_template: the chat template to ship (default: the tokenizer's).
        max_shard_bytes: size limit of one safetensors shard (a bigger tensor gets a
            shard of its own).

    Returns:
        The folder.

    Raises:
        Llama2Error: the state dict does not match `args`.
    """
    folder = Path(folder)
    tensors = lazy(state_dict)
    check_state_dict(tensors, args, "state dict")
    shards = plan_shards({hf_name(name): tensors.spec(name) for name in tensors}, max_shard_bytes)
    special_ids = special_token_ids(tokenizer) if tokenizer is not None else {}
    with atomic_folder(folder) as temp:
        _write_shards(temp, tensors, shards, args)
        write_json(temp / CONFIG_FILE, hf_config(args, _main_dtype(tensors), special_ids))
        write_json(temp / GENERATION_CONFIG_FILE, {"_from_model_config": True, **special_ids})
        if tokenizer is not None:
            write_hf_tokenizer(temp, tokenizer, chat_template, args.max_seq_len)
    return folder


def plan_shards(specs: Mapping[str, TensorSpec], max_shard_bytes: int) -> dict[str, dict[str, TensorSpec]]:
    """Split tensors, in order, into shard files of at most `max_shard_bytes` each.

    Returns:
        file name -> the specs it holds, in order: ``model.safetensors`` for one shard,
        ``model-0000i-of-0000n.safetensors`` for more.
    """
    groups: list[dict[str, TensorSpec]] = [{}]
    size = 0
    for name, spec in specs.items():
        nbytes = data_size({name: spec})
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = spec
        size += nbytes
    if len(groups) == 1:
        return {WEIGHT_LAYOUTS[0][0]: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": group for i, group in enumerate(groups)}


def _write_shards(
    folder: Path, tensors: LazyStateDict, shards: dict[str, dict[str, TensorSpec]], args: ModelArgs
) -> None:
    canonical = {hf_name(name): name for name in tensors}
    for file_name, specs in shards.items():
        with SafetensorsWriter(folder / file_name, specs, {"format": "pt"}) as writer:
            for hf in specs:
                writer.write(hf, to_hf_layout(canonical[hf], tensors[canonical[hf]], args))
    if len(shards) > 1:
        total = sum(data_size(specs) for specs in shards.values())
        weight_map = {hf: file_name for file_name, specs in shards.items() for hf in specs}
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _main_dtype(tensors: LazyStateDict) -> str:
    """The dtype most weight matrices have, as `config.json` names it."""
    counts = Counter(tensors.spec(name).dtype for name in tensors if len(tensors.spec(name).shape) == 2)
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return _TORCH_DTYPE_NAMES.get(dtype, "float32")


def hf_config(args: ModelArgs, torch_dtype: str = "float32", special_ids: Mapping[str, int] | None = None) -> dict:
    """A Hugging Face `LlamaConfig` (as `config.json` holds it) for `args`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": args.tie_word_embeddings,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        **(special_ids or {}),
    }
