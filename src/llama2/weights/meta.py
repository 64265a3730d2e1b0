"""Meta's checkpoint folders: `params.json` plus `consolidated.NN.pth` model-parallel shards.

Meta's names are the canonical ones (see `llama2.model`), so reading is a merge of the
shards and writing is a split; both use one table of the dimensions fairscale's
model-parallel layers split each weight along. Both stream: a tensor is merged from
the memory-mapped shards when it is looked up, and written into every shard file as it
arrives (`torch_zip.TorchSaveWriter`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ModelArgs, llama2_ffn_hidden_dim
from ..errors import Llama2Error
from .checkpoint import Checkpoint, LazyStateDict, TensorSpec, lazy, materialize
from .common import (
    atomic_folder,
    build_args,
    check_dtype,
    check_state_dict,
    describe_names,
    dtype_name,
    load_torch_file,
    read_folder_config,
    write_json,
)
from .tokenizer_files import SENTENCEPIECE_FILE, write_meta_tokenizer
from .torch_zip import TorchSaveWriter

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
_PARAM_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
)
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
    check_dtype(dtype, Path(folder))
    return materialize(open_meta(folder), dtype, device)


def open_meta(folder: str | os.PathLike) -> Checkpoint:
    """Open a Meta checkpoint folder lazily: like `read_meta`, but each tensor is merged when looked up.

    The shards are memory-mapped; the returned `state_dict` is a `LazyStateDict` in the
    files' dtype, checked against `params.json` before it is returned.
    """
    folder = Path(folder)
    params_path, params = read_folder_config(folder, PARAMS_FILE, "a Meta checkpoint")
    shards = [load_torch_file(path) for path in shard_paths(folder)]
    specs = merged_specs(shards, folder)
    args = args_from_params(params, {name: spec.shape for name, spec in specs.items()}, params_path)

    def load(name: str) -> torch.Tensor:
        dim = split_dim(name)
        pieces = [shard[name] for shard in shards]
        return pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim=dim)

    state_dict = LazyStateDict(specs, load, str(folder))
    check_state_dict(state_dict, args, str(folder))
    return Checkpoint(
        args=args,
        state_dict=state_dict,
        tokenizer_metadata=None,
        chat_template=None,
        source=str(folder),
        format="meta",
        tensor_types={name: dtype_name(spec.dtype) for name, spec in specs.items()},
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


def merged_specs(shards: list[dict[str, torch.Tensor]], folder: Path) -> dict[str, TensorSpec]:
    """Shape and dtype of every whole tensor the shards hold once joined (`SPLIT_DIMS`); drops `IGNORED_TENSORS`.

    Raises:
        Llama2Error: the shards hold different tensors, an unknown tensor, or pieces
            that cannot be joined.
    """
    names = shards[0].keys()
    for index, shard in enumerate(shards[1:], start=1):
        if shard.keys() != names:
            different = sorted(shard.keys() ^ names)
            raise Llama2Error(
                f"{folder}: shard {index:02d} and shard 00 hold different tensors ({describe_names(different)})"
            )
    specs = {}
    for name in names:
        if name in IGNORED_TENSORS:
            continue
        try:
            dim = split_dim(name)
        except KeyError:
            raise Llama2Error(f"{folder}: unexpected tensor {name}") from None
        specs[name] = _joined_spec(name, [shard[name] for shard in shards], dim, folder)
    return specs


def _joined_spec(name: str, pieces: list[torch.Tensor], dim: int | None, folder: Path) -> TensorSpec:
    first = pieces[0]
    if dim is None or len(pieces) == 1:
        return TensorSpec(tuple(first.shape), first.dtype)
    shapes = [list(piece.shape) for piece in pieces]
    joinable = all(
        piece.dtype == first.dtype
        and piece.dim() == first.dim() > dim
        and all(n == m for axis, (n, m) in enumerate(zip(piece.shape, first.shape)) if axis != dim)
        for piece in pieces
    )
    if not joinable:
        raise Llama2Error(f"{folder}: shards of {name} cannot be joined along dim {dim} (shapes {shapes})")
    shape = list(first.shape)
    shape[dim] = sum(piece.shape[dim] for piece in pieces)
    return TensorSpec(tuple(shape), first.dtype)


def args_from_params(params: dict, shapes: Mapping[str, tuple[int, ...]], path: Path) -> ModelArgs:
    """`ModelArgs` from Meta's params.json; `vocab_size: -1` means "the embedding's row count" (from `shapes`)."""
    absent = [key for key in _REQUIRED_PARAMS if key not in params]
    if absent:
        raise Llama2Error(f"{path}: missing {', '.join(absent)}")
    if params.get("use_scaled_rope"):
        raise Llama2Error(f"{path}: scaled RoPE (use_scaled_rope) is not supported")
    fields = {key: params[key] for key in _PARAM_FIELDS if params.get(key) is not None}
    if fields.get("vocab_size", -1) == -1:
        if "tok_embeddings.weight" not in shapes:
            raise Llama2Error(f"{path.parent}: missing tensor tok_embeddings.weight")
        fields["vocab_size"] = shapes["tok_embeddings.weight"][0]
    return build_args(fields, path)


def _tokenizer_path(folder: Path) -> str | None:
    """Meta ships tokenizer.model next to the weights or one folder up."""
    for candidate in (folder / SENTENCEPIECE_FILE, folder.parent / SENTENCEPIECE_FILE):
        if candidate.is_file():
            return str(candidate)
    return None


# ---------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------


def write_meta(
    args: ModelArgs,
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    num_shards: int = 1,
    *,
    tokenizer=None,
    chat_template: str | None = None,
) -> Path:
    """Write a Meta checkpoint folder: `params.json`, `num_shards` model-parallel shards, `tokenizer.model`.

    Tensors are streamed: each is read once and its slices written straight into every
    shard file. The folder is built under a temporary name and renamed into place when
    complete, replacing any previous `folder` as a whole. Tied embeddings are written
    untied (Meta's format has no tying). A `hidden_dim` that Llama 2's rule does not give
    from `multiple_of`/`ffn_dim_multiplier` is encoded by choosing values that do.

    Args:
        args: the architecture.
        state_dict: canonical weights matching `args` (a dict or a `LazyStateDict`).
        folder: destination folder.
        num_shards: number of model-parallel shards; must divide every split dimension
            and the (KV) head counts, as Meta's loader requires.
        tokenizer: a `llama2.tokenizer.Tokenizer` to write as `tokenizer.model` (see
            `tokenizer_files.write_meta_tokenizer`); None writes the weights only.
        chat_template: a chat template to keep beside it (default: the tokenizer's).

    Returns:
        The folder.

    Raises:
        Llama2Error: the state dict does not match `args`, or the model cannot be split
            into `num_shards`.
    """
    folder = Path(folder)
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise Llama2Error(f"{folder}: num_shards must be a positive integer, got {num_shards!r}")
    tensors = lazy(state_dict)
    check_state_dict(tensors, args, "state dict")
    tensors = _untied(tensors)
    _check_divisible(args, tensors, num_shards, folder)
    params = params_from_args(args)
    with atomic_folder(folder) as temp:
        _write_shards(temp, tensors, num_shards)
        write_json(temp / PARAMS_FILE, params)
        if tokenizer is not None:
            write_meta_tokenizer(temp, tokenizer, chat_template)
    return folder


def _write_shards(folder: Path, tensors: LazyStateDict, num_shards: int) -> None:
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(
                TorchSaveWriter(folder / f"consolidated.{index:02d}.pth", _shard_specs(tensors, index, num_shards))
            )
            for index in range(num_shards)
        ]
        for name in tensors:
            tensor = tensors[name]
            for index, writer in enumerate(writers):
                writer.write(name, shard_piece(name, tensor, index, num_shards))


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


def _untied(tensors: LazyStateDict) -> LazyStateDict:
    """`tensors`, with ``output.weight`` read from the embeddings when it is absent (tied)."""
    if "output.weight" in tensors:
        return tensors
    specs = {name: tensors.spec(name) for name in tensors}
    specs["output.weight"] = specs["tok_embeddings.weight"]
    return LazyStateDict(specs, lambda name: tensors["tok_embeddings.weight" if name == "output.weight" else name])


def _check_divisible(args: ModelArgs, tensors: LazyStateDict, num_shards: int, folder: Path) -> None:
    for heads, count in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads)):
        if count % num_shards:
            raise Llama2Error(f"{folder}: cannot split {heads} = {count} heads into {num_shards} shards")
    for name in tensors:
        dim, shape = split_dim(name), tensors.spec(name).shape
        if dim is not None and shape[dim] % num_shards:
            raise Llama2Error(
                f"{folder}: cannot split {name} (dim {dim} of size {shape[dim]}) into {num_shards} shards"
            )


def _shard_specs(tensors: LazyStateDict, index: int, num_shards: int) -> dict[str, TensorSpec]:
    specs = {}
    for name in tensors:
        dim, (shape, dtype) = split_dim(name), tensors.spec(name)
        if dim is not None:
            shape = tuple(n // num_shards if axis == dim else n for axis, n in enumerate(shape))
        specs[name] = TensorSpec(shape, dtype)
    return specs


def shard_piece(name: str, tensor: torch.Tensor, index: int, num_shards: int) -> torch.Tensor:
    """Shard `index` of `num_shards` of canonical tensor `name`: its slice along its `SPLIT_DIMS` dimension."""
    dim = split_dim(name)
    return tensor if dim is None else tensor.chunk(num_shards, dim=dim)[index]
