"""Shared test helpers: tiny random Hugging Face Llama models as an independent reference, error checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama2.errors import Llama2Error
from llama2.model import Transformer
from llama2.weights import Checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
# Meta's Llama 2 tokenizer.model (md5 eeec4125e9c7560836b4873b6f8e3025), the reference for tokens.
LLAMA2_MODEL = FIXTURES / "llama2-tokenizer.model"
# The same vocabulary as a GGUF file with no tensors, as GGUF conversions of Llama 2 carry it.
LLAMA2_GGUF = FIXTURES / "llama2-vocab.gguf"


def expect_error(call, *needles) -> Llama2Error:
    """Run `call`, expecting a one-line Llama2Error mentioning every needle; return the error."""
    with pytest.raises(Llama2Error) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return caught.value


def make_hf_llama(
    folder: Path,
    *,
    gqa: bool = False,
    seed: int = 0,
    tie: bool = False,
    rope_theta: float = 10000.0,
    max_shard_size: str | None = None,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 96,
    vocab_size: int = 128,
):
    """Build a random tiny `transformers.LlamaForCausalLM`, save it to `folder`, return it (eval, fp32, eager).

    Weights are normal with std 0.2 (norm weights 1 + that) from a generator seeded with `seed`,
    so activations are large enough for a layout mistake to show in the logits.
    """
    import transformers

    if num_kv_heads is None:
        num_kv_heads = num_heads // 2 if gqa else num_heads
    config = transformers.LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return model


def our_model(checkpoint: Checkpoint) -> Transformer:
    """Our Transformer built on the meta device and loaded strictly from `checkpoint`."""
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
    model.load_state_dict(checkpoint.state_dict, strict=True, assign=True)
    return model.eval()


def random_tokens(vocab_size: int, batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    """Token ids [batch, length] from a seeded generator."""
    return torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits for `tokens`, [B, T, vocab]."""
    return hf_model(input_ids=tokens).logits.float()


@torch.no_grad()
def assert_matches_reference(model: Transformer, hf_model, tokens: torch.Tensor, prefill: int = 3, atol: float = 1e-4):
    """Our full-sequence logits and cached prefill + one-token decode logits equal transformers'."""
    expected = reference_logits(hf_model, tokens)
    full = model(tokens)
    assert (full - expected).abs().max().item() <= atol

    batch, length = tokens.shape
    model.setup_caches(batch, length)
    try:
        steps = [model(tokens[:, :prefill], input_pos=torch.arange(prefill))]
        steps += [model(tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(prefill, length)]
    finally:
        model.clear_caches()
    cached = torch.cat(steps, dim=1)  # [B, T, vocab]
    assert (cached - expected).abs().max().item() <= atol
