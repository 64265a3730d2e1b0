"""Meta's checkpoint folders: `params.json` plus `consolidated.NN.pth` model-parallel shards.

Meta's names are the canonical ones (see `llama2.model`), so reading is a merge of the
shards and writing is a split; both use one table of the dimensions fairscale's
model-parallel layers split each weight along.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelArgs, llama2_ffn_hidden_dim
from ..errors import Llama2Error
from .checkpoint import Checkpoint
from .common import (
    atomic_output,
    build_args,
    check_state_dict,
    describe_names,
    dtype_name,
    load_torch_file,
    read_folder_config,
)

PARAMS_FILE = "params.json"
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")

# The dimension along which Meta's model-parallel layers split each weight, keyed by the
# module name (the part of a canonical name before ".weight"); None means replicated.
SPLIT_DIMS: dict[str, int | None] = {
    "tok_embeddings": 1,  # ParallelEmbedding: split the embedding dimension
    "wq": 0,  # ColumnParallelLinear: split output rows
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,  # RowParallelLinear: split input columns
    "w2": 1,
    "attention_norm": None,  # RMSNorm weights: identical in every shard
    "ffn_norm": None,
    "norm": None,
}

# Tensors in Meta's files that are not weights (precomputed RoPE frequencies).
IGNORED_TENSORS = frozenset({"rope.freqs"})

# params.json keys mapped onto `ModelArgs` fields of the same name.
_PARAM_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                 "ffn_dim_multiplier", "norm_eps", "rope_theta")
_REQUIRED_PARAMS = ("dim", "n_layers", "n_heads")
_DEFAULT_ROPE_THETA = 10000.0


# ---------------------------------------------------------------------------------------
# Shard layout.
# ---------------------------------------------------------------------------------------


def split_dim(name: str) -> int | None:
    """Dimension Meta's model-parallel shards split the canonical tensor `name` along.

    Raises:
        KeyError: `name` is not a canonical weight name.
    """
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if not name.endswith(".weight") or module not in SPLIT_DIMS:
        raise KeyError(name)
    return SPLIT_DIMS[module]


# ---------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------


def read_meta(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> Checkpoint:
    """Read a Meta checkpoint folder (`params.json` + `consolidated.NN.pth`).

    Model-parallel shards are merged along the dimensions Meta split them (`SPLIT_DIMS`).
    A single shard stays memory-mapped when no dtype conversion is needed.

    Args:
        folder: the checkpoint folder.
        dtype: floating-point type of the returned weights.
        device: device of the returned weights.

    Returns:
        A `Checkpoint` with canonical names and `format="meta"`.

    Raises:
        Llama2Error: missing or malformed files, inconsistent shards, unknown tensors,
            or shapes that contradict `params.json`.
    """
    folder = Path(folder)
    params_path, params = read_folder_config(folder, PARAMS_FILE, dtype, "a Meta checkpoint")
    shards = [load_torch_file(path) for path in shard_paths(folder)]
    merged = merge_shards(shards, folder)
    args = args_from_params(params, merged, params_path)
    check_state_dict(merged, args, str(folder))
    return Checkpoint(
        args=args,
        state_dict={name: t.to(device=device, dtype=dtype) for name, t in merged.items()},
        tokenizer_metadata=None,
        chat_template=None,
        source=str(folder),
        format="meta",
        tensor_types={name: dtype_name(t.dtype) for name, t in merged.items()},
        metadata={"params": params, "num_shards": len(shards), "tokenizer_path": _tokenizer_path(folder)},
    )


def shard_paths(folder: Path) -> list[Path]:
    """`consolidated.00.pth` ... in order, checking the numbering has no gaps."""
    numbered = {}
    for path in folder.iterdir():
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise Llama2Error(f"{folder}: no consolidated.NN.pth weight shards")
    missing = sorted(set(range(max(numbered) + 1)) - numbered.keys())
    if missing:
        raise Llama2Error(
            f"{folder}: found {len(numbered)} shard(s) numbered up to {max(numbered):02d} "
            f"but consolidated.{missing[0]:02d}.pth is missing"
        )
    return [numbered[index] for index in sorted(numbered)]


def merge_shards(shards: list[dict[str, torch.Tensor]], folder: Path) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel shards into whole tensors (`SPLIT_DIMS`); drop `IGNORED_TENSORS`."""
    names = shards[0].keys()
    for index, shard in enumerate(shards[1:], start=1):
        if shard.keys() != names:
            different = sorted(shard.keys() ^ names)
            raise Llama2Error(
                f"{folder}: shard {index:02d} and shard 00 hold different tensors ({describe_names(different)})"
            )
    merged = {}
    for name in names:
        if name in IGNORED_TENSORS:
            continue
        try:
            dim = split_dim(name)
        except KeyError:
            raise Llama2Error(f"{folder}: unexpected tensor {name}") from None
        pieces = [shard[name] for shard in shards]
        merged[name] = pieces[0] if dim is None or len(pieces) == 1 else _concat(name, pieces, dim, folder)
    return merged


def _concat(name: str, pieces: list[torch.Tensor], dim: int, folder: Path) -> torch.Tensor:
    try:
        return torch.cat(pieces, dim=dim)
    except RuntimeError:
        shapes = [list(piece.shape) for piece in pieces]
        raise Llama2Error(f"{folder}: shards of {name} cannot be joined along dim {dim} (shapes {shapes})") from None


def args_from_params(params: dict, state_dict: Mapping[str, torch.Tensor], path: Path) -> ModelArgs:
    """`ModelArgs` from Meta's params.json; `vocab_size: -1` means "the embedding's row count"."""
    absent = [key for key in _REQUIRED_PARAMS if key not in params]
    if absent:
        raise Llama2Error(f"{path}: missing {', '.join(absent)}")
    if params.get("use_scaled_rope"):
        raise Llama2Error(f"{path}: scaled RoPE (use_scaled_rope) is not supported")
    fields = {key: params[key] for key in _PARAM_FIELDS if params.get(key) is not None}
    if fields.get("vocab_size", -1) == -1:
        if "tok_embeddings.weight" not in state_dict:
            raise Llama2Error(f"{path.parent}: missing tensor tok_embeddings.weight")
        fields["vocab_size"] = state_dict["tok_embeddings.weight"].shape[0]
    return build_args(fields, path)


def _tokenizer_path(folder: Path) -> str | None:
    """Meta ships tokenizer.model next to the weights or one folder up."""
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    return None


# ---------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------


def write_meta(
    args: ModelArgs, state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike, num_shards: int = 1
) -> Path:
    """Write a Meta checkpoint folder: `params.json` and `num_shards` model-parallel shards.

    Every file is written under a temporary name and renamed into place; stale
    `consolidated.NN.pth` files beyond `num_shards` are removed. Tied embeddings are
    written untied (Meta's format has no tying). A `hidden_dim` that Llama 2's rule does
    not give from `multiple_of`/`ffn_dim_multiplier` is encoded by choosing values that do.

    Args:
        args: the architecture.
        state_dict: canonical weights matching `args`.
        folder: destination folder (created if missing).
        num_shards: number of model-parallel shards; must divide every split dimension.

    Returns:
        The folder.

    Raises:
        Llama2Error: the state dict does not match `args`, or a split dimension is not
            divisible by `num_shards`.
    """
    folder = Path(folder)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise Llama2Error(f"{folder}: num_shards must be a positive integer, got {num_shards!r}")
    check_state_dict(state_dict, args, "state dict")
    state_dict = _untied(state_dict)
    _check_divisible(state_dict, num_shards, folder)
    params = params_from_args(args)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(num_shards):
        with atomic_output(folder / f"consolidated.{index:02d}.pth") as temp:
            torch.save(shard_of(state_dict, index, num_shards), temp)
    _remove_stale_shards(folder, num_shards)
    with atomic_output(folder / PARAMS_FILE) as temp:
        temp.write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return folder


def params_from_args(args: ModelArgs) -> dict:
    """Meta's params.json for `args` (optional keys only where they differ from Llama 2's defaults)."""
    multiple_of, multiplier = _ffn_params(args)
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": multiple_of,
        "norm_eps": args.norm_eps,
    }
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    if args.rope_theta != _DEFAULT_ROPE_THETA:
        params["rope_theta"] = args.rope_theta
    return params


def _ffn_params(args: ModelArgs) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) from which Llama 2's rule derives `args.hidden_dim`."""
    if llama2_ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) == args.hidden_dim:
        return args.multiple_of, args.ffn_dim_multiplier
    # Round up to a multiple of hidden_dim itself, scaling the base width down when it is larger.
    base = llama2_ffn_hidden_dim(args.dim, 1, None)
    multiplier = None if base <= args.hidden_dim else args.hidden_dim / base
    if llama2_ffn_hidden_dim(args.dim, args.hidden_dim, multiplier) != args.hidden_dim:
        raise Llama2Error(f"hidden_dim {args.hidden_dim} cannot be expressed in Meta's params.json for dim {args.dim}")
    return args.hidden_dim, multiplier


def _untied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "output.weight" in state_dict:
        return dict(state_dict)
    return {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}


def _check_divisible(state_dict: Mapping[str, torch.Tensor], num_shards: int, folder: Path) -> None:
    for name, tensor in state_dict.items():
        dim = split_dim(name)
        if dim is not None and tensor.shape[dim] % num_shards:
            raise Llama2Error(
                f"{folder}: cannot split {name} (dim {dim} of size {tensor.shape[dim]}) into {num_shards} shards"
            )


def shard_of(state_dict: Mapping[str, torch.Tensor], index: int, num_shards: int) -> dict[str, torch.Tensor]:
    """Shard `index` of `num_shards`: each tensor's slice along its `SPLIT_DIMS` dimension."""
    shard = {}
    for name, tensor in state_dict.items():
        dim = split_dim(name)
        piece = tensor if dim is None else tensor.chunk(num_shards, dim=dim)[index]
        shard[name] = _compact(piece)
    return shard


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with storage of its own (torch.save writes a view's whole storage)."""
    owns_storage = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes
    if tensor.is_contiguous() and owns_storage:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _remove_stale_shards(folder: Path, num_shards: int) -> None:
    for path in folder.iterdir():
        match = SHARD_PATTERN.fullmatch(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()
