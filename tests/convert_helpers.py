"""Random canonical checkpoints for the conversion tests."""

from __future__ import annotations

import torch

from llama2.config import ModelArgs
from llama2.weights.checkpoint import expected_shapes


def tiny_args(*, gqa: bool = True, vocab_size: int = 128, tie: bool = False, **changes) -> ModelArgs:
    """dim 64, 16 heads of 4 (8 KV heads with GQA), FFN 192: every split dimension divides by 8, rows by 32."""
    fields = dict(
        dim=64,
        n_layers=2,
        n_heads=16,
        n_kv_heads=8 if gqa else 16,
        vocab_size=vocab_size,
        hidden_dim=192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=64,
        tie_word_embeddings=tie,
    )
    return ModelArgs(**{**fields, **changes})


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Normal weights with std 0.2 (norms 1 + that), so that layout mistakes show in logits."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in expected_shapes(args).items():
        noise = torch.randn(shape, generator=generator) * 0.2
        state_dict[name] = (noise + 1.0 if name.endswith("norm.weight") else noise).to(dtype)
    return state_dict


def architecture(args: ModelArgs) -> tuple:
    """What every format keeps of `args` (Meta's params.json has no context length)."""
    return (
        args.dim,
        args.n_layers,
        args.n_heads,
        args.n_kv_heads,
        args.vocab_size,
        args.hidden_dim,
        args.norm_eps,
        args.rope_theta,
        args.tie_word_embeddings,
    )


def assert_bitwise_equal(got: dict, want: dict) -> None:
    """Same names, dtypes and bytes."""
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
