"""LoRA adapters, merging, adapter files, and QLoRA's NF4/int8 frozen bases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama2.config import ModelArgs
from llama2.model import Transformer
from llama2.train.lora import LoRAConfig, LoRALinear, apply_lora, load_adapters, merge_lora, save_adapters
from llama2.train.nf4 import NF4_LEVELS, NF4Linear, frozen_linear, nf4_dequantize, nf4_quantize

from helpers import expect_error
from train_helpers import one_thread  # noqa: F401 (autouse fixture)

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ARGS).eval()


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices, so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


TOKENS = torch.randint(97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_merge_gives_the_logits_of_the_adapter_model(quantize):
    model = apply_lora(
        tiny_model(), LoRAConfig(rank=4, alpha=8, targets=["wq", "wv", "w2", "output"], quantize_base=quantize)
    )
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(TOKENS)
        merged = merge_lora(model)(TOKENS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_fresh_adapters_leave_the_model_unchanged_and_only_they_train():
    base = tiny_model()
    with torch.no_grad():
        expected = base(TOKENS)
    model = apply_lora(base, LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        assert torch.equal(model(TOKENS), expected)  # B starts at zero
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_a", "lora_b")) for name in trainable)
    assert len(trainable) == 2 * 7 * ARGS.n_layers  # every linear layer of every block
    lora = model.layers[0].attention.wq
    assert lora.scale == 2.0 and lora.lora_a.shape == (2, 64) and lora.lora_b.shape == (64, 2)


def test_lora_forward_is_the_formula():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5, bias=False)
    lora = LoRALinear(linear, rank=3, alpha=6)
    nn.init.normal_(lora.lora_b)
    x = torch.randn(4, 6)
    expected = x @ linear.weight.T + 2.0 * (x @ lora.lora_a.T @ lora.lora_b.T)
    torch.testing.assert_close(lora(x), expected)


def test_adapters_round_trip_through_files(tmp_path):
    config = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    model = apply_lora(tiny_model(), config)
    randomize_adapters(model)
    save_adapters(model, config, tmp_path / "adapter", base_model="tiny")
    reloaded = load_adapters(tiny_model(), tmp_path / "adapter")
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS), model(TOKENS))
    expect_error(lambda: load_adapters(tiny_model(), tmp_path / "missing"), "adapter config")


def test_bad_lora_settings_are_errors():
    expect_error(lambda: apply_lora(tiny_model(), LoRAConfig(rank=0)), "rank")
    expect_error(lambda: apply_lora(tiny_model(), LoRAConfig(rank=2, targets=["nothing"])), "no linear layer")


# ---------------------------------------------------------------------------- NF4


def test_nf4_levels_are_normal_quantiles():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) (offset 0.9677), scaled to [-1, 1],
    plus 0."""
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(levels.float(), torch.tensor(NF4_LEVELS), rtol=0, atol=2e-6)


def test_nf4_quantize_hand_built_block():
    # One block of 4 values with absmax 2: normalized to 1, -0.5, 0.03, -1 -> levels 15, 2 (-0.525), 7 (0), 0
    # (0.03 is below the midpoint 0.0398 between levels 7 and 8).
    codes, absmax = nf4_quantize(torch.tensor([2.0, -1.0, 0.06, -2.0]), block_size=4)
    assert absmax.tolist() == [2.0]
    assert codes.tolist() == [(15 << 4) | 2, (7 << 4) | 0]  # first value in the high nibble
    values = nf4_dequantize(codes, absmax, torch.Size([4]), block_size=4)
    assert values.tolist() == pytest.approx([2.0, 2 * NF4_LEVELS[2], 0.0, -2.0])


def test_nf4_blocks_and_error_bound():
    weight = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    codes, absmax = nf4_quantize(weight)
    assert codes.dtype == torch.uint8 and codes.numel() == weight.numel() // 2 and absmax.numel() == 96 * 80 // 64
    restored = nf4_dequantize(codes, absmax, weight.shape)
    blocks = weight.reshape(-1, 64)
    half_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
    error = (restored.reshape(-1, 64) - blocks).abs().amax(dim=1)
    assert torch.all(error <= half_gap * blocks.abs().amax(dim=1) + 1e-6)


def test_frozen_quantized_linear_gradient_is_against_the_dequantized_weight():
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    base = NF4Linear(weight)
    x = torch.randn(3, 128, requires_grad=True)
    frozen_linear(x, base).square().sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    (reference_x @ base.dequantize().T).square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)
    assert not any(t.requires_grad for t in base.buffers())
