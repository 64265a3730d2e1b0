"""What every weights reader returns: a `Checkpoint` in the canonical (Meta) naming.

A reader's `open_*` function returns a `Checkpoint` whose `state_dict` is a
`LazyStateDict`: every tensor is read from the source when it is looked up and is not
kept, so a conversion streams tensor by tensor. `read_*` materializes it into a dict.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..config import ModelArgs
from ..errors import Llama2Warning


class TensorSpec(NamedTuple):
    """Shape and dtype of a tensor, known before it is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Canonical name -> tensor, each read from its source on lookup and never cached.

    Args:
        specs: canonical name -> `TensorSpec` of the tensor a lookup returns, in the
            order the tensors are best read.
        load: reads one tensor by canonical name.
        source: the file or folder read, for messages; when given, every tensor read is
            checked for NaN/Inf values (a `Llama2Warning` names it).
    """

    def __init__(self, specs: Mapping[str, TensorSpec], load: Callable[[str], torch.Tensor], source: str = ""):
        self._specs = dict(specs)
        self._load = load
        self._source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._specs:
            raise KeyError(name)
        tensor = self._load(name)
        if self._source:
            warn_if_not_finite(name, tensor, self._source)
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._specs  # Mapping's default would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype of tensor `name`, without reading it."""
        return self._specs[name]

    def map(self, fn: Callable[[str, torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None) -> LazyStateDict:
        """A lazy view applying `fn(name, tensor)` to every tensor read (`dtype`: its result's dtype, if it changes)."""
        specs = {name: TensorSpec(spec.shape, dtype or spec.dtype) for name, spec in self._specs.items()}
        return LazyStateDict(specs, lambda name: fn(name, self[name]))


def lazy(state_dict: Mapping[str, torch.Tensor]) -> LazyStateDict:
    """`state_dict` as a `LazyStateDict` (itself when it already is one)."""
    if isinstance(state_dict, LazyStateDict):
        return state_dict
    specs = {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in state_dict.items()}
    return LazyStateDict(specs, state_dict.__getitem__)


def warn_if_not_finite(name: str, tensor: torch.Tensor, source: str) -> None:
    """Warn (`Llama2Warning`) when floating-point `tensor` holds NaN or infinite values.

    A NaN or infinity makes the sum non-finite, and summing runs at memory speed (unlike
    `isfinite`), so only a non-finite sum (or an overflowing one) costs the exact count.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        warnings.warn(f"{source}: tensor {name} has {bad} NaN/Inf value(s)", Llama2Warning, stacklevel=3)


@dataclass
class Checkpoint:
    """A loaded model checkpoint, independent of the file format it came from.

    Attributes:
        args: the architecture.
        state_dict: weights under Meta's names (``tok_embeddings.weight``,
            ``layers.N.attention.wq.weight``, ...), in Meta's interleaved RoPE layout.
            ``output.weight`` is absent when ``args.tie_word_embeddings`` is set. A dict
            from `read_*`, a `LazyStateDict` from `open_*`.
        tokenizer_metadata: format-specific tokenizer description, or None (for GGUF:
            every ``tokenizer.*`` key as plain python values).
        chat_template: the Jinja chat template the checkpoint ships, if any.
        source: where it was read from (a path).
        format: the reader's format name, e.g. ``"gguf"``.
        tensor_types: canonical name -> storage type in the file (``"Q4_1"``, ``"F32"``, ...).
        metadata: other scalar metadata of the file (for GGUF: ``general.*`` and
            architecture keys).
    """

    args: ModelArgs
    state_dict: Mapping[str, torch.Tensor]
    tokenizer_metadata: dict[str, Any] | None = None
    chat_template: str | None = None
    source: str = ""
    format: str = ""
    tensor_types: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def materialize(checkpoint: Checkpoint, dtype: torch.dtype, device) -> Checkpoint:
    """`checkpoint` with every tensor read into a dict, cast to `dtype` and moved to `device`."""
    state_dict = {name: t.to(device=device, dtype=dtype) for name, t in checkpoint.state_dict.items()}
    return dataclasses.replace(checkpoint, state_dict=state_dict)


def iter_expected_shapes(args: ModelArgs) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Yield ``(canonical name, torch shape)`` for every weight of a model with `args`.

    Lazy, so that a caller can look at the first few names of an absurd configuration
    without building all of them. ``output.weight`` is left out when the embeddings are
    tied.
    """
    dim, hidden, vocab = args.dim, args.hidden_dim, args.vocab_size
    q_dim = args.n_heads * args.head_dim
    kv_dim = args.n_kv_heads * args.head_dim
    yield "tok_embeddings.weight", (vocab, dim)
    yield "norm.weight", (dim,)
    if not args.tie_word_embeddings:
        yield "output.weight", (vocab, dim)
    layer_shapes = {
        "attention.wq.weight": (q_dim, dim),
        "attention.wk.weight": (kv_dim, dim),
        "attention.wv.weight": (kv_dim, dim),
        "attention.wo.weight": (dim, q_dim),
        "feed_forward.w1.weight": (hidden, dim),
        "feed_forward.w2.weight": (dim, hidden),
        "feed_forward.w3.weight": (hidden, dim),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    for i in range(args.n_layers):
        for name, shape in layer_shapes.items():
            yield f"layers.{i}.{name}", shape


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical name -> torch shape of every weight of a model with `args`.

    ``output.weight`` is left out when the embeddings are tied.
    """
    return dict(iter_expected_shapes(args))
