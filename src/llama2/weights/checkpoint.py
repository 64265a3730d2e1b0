"""What every weights reader returns: a `Checkpoint` in the canonical (Meta) naming."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelArgs


@dataclass
class Checkpoint:
    """A loaded model checkpoint, independent of the file format it came from.

    Attributes:
        args: the architecture.
        state_dict: weights under Meta's names (``tok_embeddings.weight``,
            ``layers.N.attention.wq.weight``, ...), in Meta's interleaved RoPE layout.
            ``output.weight`` is absent when ``args.tie_word_embeddings`` is set.
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
    state_dict: dict[str, torch.Tensor]
    tokenizer_metadata: dict[str, Any] | None = None
    chat_template: str | None = None
    source: str = ""
    format: str = ""
    tensor_types: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


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
