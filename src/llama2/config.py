"""Model architecture: one `ModelArgs` dataclass and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import Llama2Error


@dataclass
class ModelArgs:
    """Architecture of a Llama-family decoder.

    Field names and defaults follow Meta's `params.json` for Llama 2. The FFN width is
    derived with Llama 2's rule unless `hidden_dim` is given explicitly (other
    Llama-architecture checkpoints, such as GGUF or Hugging Face ones, state it).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama2_ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise `Llama2Error` when the sizes cannot describe a working model."""
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise Llama2Error(f"invalid model config: {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise Llama2Error(f"invalid model config: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise Llama2Error(
                f"invalid model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise Llama2Error(
                f"invalid model config: head dimension {self.head_dim} must be even for rotary embeddings"
            )
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise Llama2Error("invalid model config: norm_eps and rope_theta must be positive")

    def num_params(self) -> int:
        """Number of parameters of the model these arguments describe."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        feed_forward = 3 * self.dim * self.hidden_dim
        per_layer = attention + feed_forward + 2 * self.dim
        embeddings = self.vocab_size * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return embeddings + self.n_layers * per_layer + self.dim + head

    def replace(self, **changes) -> ModelArgs:
        """A copy with some fields changed (derived sizes recomputed when their inputs change)."""
        if {"dim", "multiple_of", "ffn_dim_multiplier"} & changes.keys() and "hidden_dim" not in changes:
            changes["hidden_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def llama2_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama 2's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_LLAMA2_SIZES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32),
    "13b": dict(dim=5120, n_layers=40, n_heads=40),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
}

PRESETS: dict[str, dict] = {}
for _size, _fields in _LLAMA2_SIZES.items():
    PRESETS[f"llama2-{_size}"] = _fields
    PRESETS[f"llama2-{_size}-chat"] = _fields
PRESETS.update(
    {
        # Tiny shapes for tests and demos, with the real Llama 2 vocabulary.
        "tiny": dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=256),
        "tiny-gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256),
        "small": dict(dim=288, n_layers=6, n_heads=6, multiple_of=32, max_seq_len=512),
    }
)


def model_args_from_preset(name: str, **overrides) -> ModelArgs:
    """`ModelArgs` for a preset looked up by its exact name, e.g. ``"llama2-70b"``."""
    if name not in PRESETS:
        raise Llama2Error(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


def describe_args(model_args: ModelArgs) -> dict[str, str]:
    """Human-readable architecture summary, one entry per line of `llama2 info`."""
    params = model_args.num_params()
    return {
        "parameters": f"{human_count(params)} ({params:,})",
        "layers": str(model_args.n_layers),
        "dim": str(model_args.dim),
        "heads": f"{model_args.n_heads} (KV heads {model_args.n_kv_heads}, head dim {model_args.head_dim})",
        "ffn hidden dim": str(model_args.hidden_dim),
        "vocab size": str(model_args.vocab_size),
        "context": str(model_args.max_seq_len),
        "rope theta": f"{model_args.rope_theta:g}",
        "norm eps": f"{model_args.norm_eps:g}",
        "tied embeddings": str(model_args.tie_word_embeddings).lower(),
    }


def human_count(n: int) -> str:
    """A count to three significant figures with a unit: 6.74B, 13.0B, 69.0B, 135M."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            decimals = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{decimals}f}{unit}"
    return str(n)
