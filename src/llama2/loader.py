"""Checkpoint -> model + tokenizer + chat format, in one place.

`load_model` opens any source the `weights/` readers know (a registry name, a GGUF
file, a Hugging Face or Meta folder), builds the `Transformer` on the meta device and
takes the checkpoint's tensors one by one (`build_model`), swapping in packed layers
where the file's blocks can be computed as stored (`quant="auto"`) or quantizing after
loading (`"int8"`, `"int4"`), then reads the tokenizer and resolves the chat format.
`Llama` (generation), `llama2 serve` and the trainer all load through here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from .chat import ChatFormat, resolve_chat_format
from .config import ModelArgs
from .errors import Llama2Error
from .fuse import fuse_projections
from .kernels import gguf_matmul_available
from .model import Transformer, meta_transformer
from .quant import PACKED_GGUF_TYPES, GGUFLinear, gguf_layer, install_quantized_head, quantize_model
from .tokenizer import Tokenizer
from .weights import Checkpoint, open_checkpoint
from .weights.inspect import checkpoint_tokenizer

QUANT_MODES = ("auto", "none", "int8", "int4")
HEAD_WEIGHTS = ("tok_embeddings.weight", "output.weight")  # quantized too when the layers are packed
TRIM_EVERY_BYTES = 32 * 2**20  # packed GGUF bytes between heap trims (a trim walks the whole heap)


@dataclass(frozen=True)
class LoadedModel:
    """What `load_model` returns: the model in eval mode with what it needs to talk.

    Attributes:
        model: the `Transformer`, on its device, without KV caches.
        tokenizer: its tokenizer.
        chat_format: the resolved chat format, or None for a completion-only model.
        chat_template: the Jinja template the checkpoint (or its tokenizer) ships, if any.
        source: where it was read from (a path), for messages.
    """

    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat | None
    chat_template: str | None
    source: str

    @property
    def args(self) -> ModelArgs:
        return self.model.args


def load_model(
    source: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    chat_format: str | None = None,
    quant: str = "auto",
    fuse: bool = True,
) -> LoadedModel:
    """Load a model, its tokenizer and its chat format from any source.

    Args:
        source: a registry name (e.g. ``"smollm2-135m-instruct"``), a GGUF file, a
            Hugging Face model folder or a Meta checkpoint folder.
        tokenizer_path: a tokenizer to use instead of the checkpoint's own.
        device: where to compute (default: CUDA when available, else the CPU).
        dtype: weight and activation dtype of the float layers (default: bfloat16 when
            layers are quantized or packed, else float32 for small models on the CPU and
            bfloat16 otherwise).
        chat_format: override of the chat format (``"llama-2"``, ``"chatml"``, a Jinja
            template); the checkpoint's own template is used otherwise, and a model
            without one that no built-in format fits gets None.
        quant: as `build_model`'s.
        fuse: join the projections that read the same input (inference); off for training.

    Raises:
        Llama2Error: an unreadable source, a tokenizer bigger than the embeddings, an
            unknown quantization or chat format.
    """
    device = torch.device(device) if device is not None else default_device()
    checkpoint = open_checkpoint(source)
    quantized = quant in ("int8", "int4") or bool(packed_gguf_linears(checkpoint, device, quant))
    dtype = dtype or (torch.bfloat16 if quantized else default_dtype(checkpoint.args, device))
    tokenizer = checkpoint_tokenizer(checkpoint, tokenizer_path)
    check_vocabulary(tokenizer, checkpoint.args, checkpoint.source)
    template = checkpoint.chat_template or tokenizer.chat_template
    fmt = _chat_format(tokenizer, template, chat_format)
    source_name = checkpoint.source
    # Only the tensors are needed from here on: drop the vocabulary metadata (the tokenizer
    # holds it now) and the construction temporaries before the model's memory is taken.
    checkpoint = dataclasses.replace(checkpoint, tokenizer_metadata=None, metadata={})
    release_freed_heap()
    model = build_model(checkpoint, device, dtype, quant, fuse=fuse)
    release_freed_heap()  # the separate projections' memory
    return LoadedModel(model, tokenizer, fmt, template, source_name)


def check_vocabulary(tokenizer: Tokenizer, args: ModelArgs, source: str) -> None:
    """Raise `Llama2Error` when the tokenizer has ids the model has no embedding for."""
    if tokenizer.n_words > args.vocab_size:
        raise Llama2Error(
            f"{source}: the tokenizer has {tokenizer.n_words} tokens but the model only {args.vocab_size} embeddings"
        )


def _chat_format(tokenizer: Tokenizer, template: str | None, override: str | None) -> ChatFormat | None:
    """The chat format, or None for a completion-only model (chat then fails with a clear message)."""
    try:
        return resolve_chat_format(tokenizer, template, override)
    except Llama2Error:
        if override is not None:
            raise
        return None


def default_dtype(args: ModelArgs, device: torch.device) -> torch.dtype:
    """float32 where it fits comfortably (exact, fast enough for small models), else bfloat16."""
    if device.type == "cuda":
        return torch.bfloat16
    fp32_bytes = 4 * args.num_params()
    return torch.float32 if fp32_bytes <= 4 * 1024**3 else torch.bfloat16


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def packed_gguf_linears(checkpoint: Checkpoint, device: torch.device, quant: str) -> dict[str, str]:
    """Canonical names of the block linears whose GGUF blocks can be computed on packed (name -> type).

    Only with ``quant="auto"`` on the CPU, where PyTorch's int4 kernel runs.
    """
    if quant != "auto" or device.type != "cpu" or not hasattr(checkpoint.state_dict, "read_raw"):
        return {}
    return {
        name: kind
        for name, kind in checkpoint.tensor_types.items()
        if kind in PACKED_GGUF_TYPES
        and name.startswith("layers.")
        and name.endswith(".weight")
        and checkpoint.args.dim % 32 == 0
        and checkpoint.args.hidden_dim % 32 == 0
    }


def build_model(
    checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str = "none", fuse: bool = False
) -> Transformer:
    """Build the Transformer without allocating, then take the checkpoint's tensors one by one.

    Args:
        checkpoint: a checkpoint, typically lazy (`open_checkpoint`) so that only the
            model's own memory is ever allocated.
        quant: "none" keeps every weight as `dtype`; "int8"/"int4" quantize the linear
            layers after loading (`llama2.quant.quantize_model`); "auto", on the CPU,
            computes GGUF Q4_0/Q4_1/Q8_0 layers and head from their blocks as stored
            where llama2's kernel runs (`llama2.kernels`), else repacked for PyTorch's
            int4 kernel (Q8_0 and the head as per-channel int8), and leaves other
            checkpoints as they are.
        fuse: join each block's q/k/v and gate/up projections (`fuse_projections`, for
            inference). Joining happens before any quantizing or repacking, on the
            file's block rows or the float rows, so no packed layout is ever taken apart.
    """
    if quant not in QUANT_MODES:
        raise Llama2Error(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    model = meta_transformer(checkpoint.args)
    packed = packed_gguf_linears(checkpoint, device, quant)
    keep_blocks = bool(packed) and gguf_matmul_available()
    state_dict, head_tables = {}, {}
    for name in checkpoint.state_dict:
        if name in packed:
            parent, attr = name.removesuffix(".weight").rsplit(".", 1)
            shape = tuple(model.get_submodule(f"{parent}.{attr}").weight.shape)
            raw = checkpoint.state_dict.read_raw(name)
            setattr(model.get_submodule(parent), attr, GGUFLinear(raw, packed[name], shape))  # as stored, for now
        elif packed and name in HEAD_WEIGHTS:
            shape = checkpoint.state_dict.spec(name).shape
            raw, type_name = checkpoint.state_dict.read_raw(name), checkpoint.tensor_types[name]
            head_tables[name] = gguf_layer(raw, type_name, shape, keep_blocks, int4=False)
        else:
            state_dict[name] = checkpoint.state_dict[name].to(device=device, dtype=dtype)
    if head_tables:
        install_quantized_head(model, head_tables, dtype)
    load_weights(model, state_dict, checkpoint.source)
    if fuse:
        fuse_projections(model)
    if packed and not keep_blocks:
        repack_gguf_blocks(model)
    if quant in ("int8", "int4") and not packed:
        quantize_model(model, quant)
    return model.eval()


def repack_gguf_blocks(model: Transformer) -> None:
    """Swap the blocks' `GGUFLinear` projections for layers PyTorch's kernels compute, one at a time, in place.

    Q4_0 / Q4_1 become `Int4Linear`, Q8_0 a per-channel `Int8Linear` (`llama2.quant.gguf_layer`).
    """
    unreleased = 0  # bytes repacked since the heap was last trimmed
    for module in model.layers.modules():
        for attr, child in list(module.named_children()):
            if isinstance(child, GGUFLinear):
                shape = (child.out_features, child.in_features)
                setattr(module, attr, gguf_layer(child.blocks, child.type_name, shape, keep_blocks=False))
                unreleased += child.blocks.numel()
                if unreleased >= TRIM_EVERY_BYTES:  # the packing's temporaries sit between kept tensors
                    release_freed_heap()
                    unreleased = 0


def release_freed_heap() -> None:
    """Give memory freed by the C heap back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Packing a model tensor by tensor frees temporaries of a few MB between the tensors it
    keeps; glibc holds on to those holes (for a 7B model, docs/performance.md).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


def load_weights(model: Transformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Assign `state_dict` to a model built on the meta device; every tensor must end up real."""
    try:
        _, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1].strip()
        raise Llama2Error(f"{source}: weights do not match the model config ({first_line})") from None
    missing = [
        name for name, t in model.state_dict().items() if t.is_meta
    ]  # modules swapped in came with their tensors
    if missing or unexpected:
        raise Llama2Error(
            f"{source}: weights do not match the model config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
