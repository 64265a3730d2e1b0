"""Packed weight-only quantized linears against independent dequantization (gguf's own).

The int4 tests also run under every other ATen CPU capability this machine has
(`test_int4_tests_pass_under_every_cpu_capability`): PyTorch's int4 layout differs per
instruction set, and nothing here may depend on it.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llama2 import quant
from llama2.config import model_args_from_preset
from llama2.errors import Llama2Error
from llama2.fuse import fuse_projections
from llama2.kernels import gguf_matmul_available
from llama2.model import Transformer
from llama2.quant import (
    GGUFLinear,
    Int4Linear,
    Int8Linear,
    int8_from_gguf,
    pack_int4,
    quantize_model,
    read_int4pack,
    unpack_q4_blocks,
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def gguf_q4_layer(qtype, rows: int, cols: int, seed: int = 0) -> tuple[Int4Linear, torch.Tensor, np.ndarray]:
    """(an `Int4Linear` from gguf-quantized blocks, gguf's own decode of them, the blocks)."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = quantize(weight, qtype)  # uint8 [rows, bytes per row]
    reference = torch.from_numpy(dequantize(blocks, qtype))
    q, scale, minimum = unpack_q4_blocks(torch.from_numpy(blocks), (rows, cols), qtype == GGMLQuantizationType.Q4_1)
    return Int4Linear.from_q4_blocks(q, scale, minimum), reference, blocks


@pytest.fixture(params=["nibbles", "read-back"])
def int4_storage(request, monkeypatch):
    """Int4Linear keeping its nibbles (small CPU weights) or reading them back through the kernel (large ones)."""
    if request.param == "read-back":
        monkeypatch.setattr(quant, "DENSE_MAX_WEIGHT_VALUES", 0)
    return request.param


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_int4_from_gguf_blocks_computes_gguf_dequantized_weights(qtype, int4_storage):
    torch.manual_seed(0)
    layer, reference, _ = gguf_q4_layer(qtype, 96, 256)
    assert (layer.nibbles is None) == (int4_storage == "read-back")
    for rows in (5, 40):  # the int4 kernel (decode); a dense GEMM on decoded nibbles (prefill) when kept
        x = torch.randn(rows, 256)
        expected = x.to(torch.bfloat16).float() @ reference.T
        assert relative_error(layer(x), expected) < 1e-2  # bf16 activations, scales and output
    assert relative_error(layer.dequantize(), reference) < 5e-3  # bf16 scales


@pytest.mark.parametrize(
    ("out_features", "in_features"), [(64, 32), (192, 576), (96, 64), (80, 128), (32, 64), (16, 256)]
)
def test_int4_values_read_back_through_the_kernel_are_the_packed_ones(out_features, in_features):
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(read_int4pack(packed, 32, out_features, in_features), q)
    assert torch.equal(read_int4pack(packed, 32, out_features, in_features, columns_per_call=24), q)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_concatenated_int4_layers_compute_ggufs_joined_rows(qtype, int4_storage):
    """Fusion joins any row counts (here 48, 80 and 16 rows) into one layer with gguf's values."""
    parts = [gguf_q4_layer(qtype, rows, 128, seed) for seed, rows in enumerate((48, 80, 16))]
    fused = Int4Linear.concat([layer for layer, _, _ in parts])
    reference = torch.from_numpy(dequantize(np.concatenate([blocks for _, _, blocks in parts]), qtype))
    assert fused.out_features == 144 and relative_error(fused.dequantize(), reference) < 5e-3
    x = torch.randn(3, 128)
    assert relative_error(fused(x), x.to(torch.bfloat16).float() @ reference.T) < 1e-2


def test_int4_layers_of_different_widths_stay_apart():
    assert Int4Linear.concat([Int4Linear.from_float(torch.randn(32, n)) for n in (64, 128)]) is None


# The int4 layer tests (the model-level ones load and convert a model: minutes with the portable kernels).
RERUN_TESTS = "int4 and not every_cpu and not quantize_command"


def test_int4_tests_pass_under_every_cpu_capability():
    """This file's int4 tests, run again with PyTorch dispatching to each other instruction set it has here."""
    current = torch.backends.cpu.get_cpu_capability().lower()
    others = [cap for cap in cpu_capabilities() if cap != current]
    for capability in others:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", RERUN_TESTS]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (
            f"ATEN_CPU_CAPABILITY={capability}:\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        )
    assert others or current == "default"  # at least the portable kernels besides this machine's best


def cpu_capabilities() -> list[str]:
    """The ATen CPU capabilities this machine can run: "default" everywhere, then x86's vector ones."""
    supported = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported"}
    return ["default"] + [cap for cap, probe in supported.items() if getattr(torch.cpu, probe, lambda: False)()]


def test_int8_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    layer = Int8Linear.from_float(weight)
    assert layer.weight.dtype == torch.int8
    assert relative_error(layer.dequantize(), weight) < 1e-2
    x = torch.randn(3, 7, 128)
    assert relative_error(layer(x), x @ layer.dequantize().T) < 1e-2


def test_int4_from_float_groups():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    layer = Int4Linear.from_float(weight, group_size=32)
    assert relative_error(layer.dequantize(), weight) < 0.12  # 4-bit min/max groups
    x = torch.randn(4, 128)
    assert relative_error(layer(x), x @ layer.dequantize().T) < 1e-2


def test_int4_rejects_unaligned_width():
    with pytest.raises(Llama2Error, match="divisible"):
        Int4Linear.from_float(torch.randn(8, 48), group_size=16)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_model_tracks_float_model(kind):
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("tiny-gqa", vocab_size=256)).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(tokens)
        quantize_model(model, kind)
        actual = model(tokens)
    assert isinstance(model.layers[0].attention.wq, Int8Linear if kind == "int8" else Int4Linear)
    assert isinstance(model.output, Int8Linear)  # the head is int8 whatever the layers are
    agreement = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= (0.9 if kind == "int8" else 0.6)


def test_tied_embedding_shares_the_int8_head_table():
    torch.manual_seed(0)
    model = Transformer(model_args_from_preset("tiny", vocab_size=256, tie_word_embeddings=True)).eval()
    embedding = model.tok_embeddings.weight.detach().clone()
    quantize_model(model, "int8")
    assert model.tok_embeddings.table is model.output
    tokens = torch.tensor([[3, 17, 255]])
    assert relative_error(model.tok_embeddings(tokens)[0], embedding[tokens[0]]) < 1e-2


def test_unknown_quantization():
    with pytest.raises(Llama2Error, match="unknown quantization"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int3")


def test_int8_from_gguf_q8_0_blocks():
    weight = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    blocks = quantize(weight, GGMLQuantizationType.Q8_0)
    reference = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q8_0))
    layer = int8_from_gguf(torch.from_numpy(blocks).reshape(-1), "Q8_0", (64, 128))
    assert relative_error(layer.dequantize(), reference) < 1e-2


@pytest.mark.parametrize(
    ("kind", "block_type", "stock_layer"), [("int4", "Q4_0", Int4Linear), ("int8", "Q8_0", Int8Linear)]
)
def test_quantize_command_then_packed_loading(tmp_path, kind, block_type, stock_layer):
    """`llama2 quantize` writes a GGUF whose blocks load packed and compute what the dequantized file does."""
    import shutil

    from llama2.cli import main
    from llama2.generation import Llama
    from llama2.tokenizer import llama2_tokenizer_path

    from helpers import make_hf_llama

    source = tmp_path / "hf"
    make_hf_llama(source, gqa=True, vocab_size=32000)
    shutil.copy(llama2_tokenizer_path(), source / "tokenizer.model")
    dest = tmp_path / f"model-{kind}.gguf"
    assert main(["quantize", str(source), str(dest), "--type", kind]) == 0

    packed = Llama.build(dest, device="cpu", max_seq_len=32)
    exact = Llama.build(dest, device="cpu", max_seq_len=32, quant="none")
    layer = packed.model.layers[1].feed_forward.w2
    if gguf_matmul_available():  # the file's blocks, as stored
        assert isinstance(layer, GGUFLinear) and layer.type_name == block_type
    else:
        assert isinstance(layer, stock_layer)
    assert isinstance(exact.model.layers[1].feed_forward.w2, torch.nn.Linear)
    tokens = torch.randint(0, 32000, (1, 12))
    for llama in (packed, exact):
        llama.model.clear_caches()
    with torch.no_grad():
        assert relative_error(packed.model(tokens), exact.model(tokens)) < 0.05


@pytest.mark.parametrize("kind", ["none", "int8", "int4"])
def test_fused_projections_compute_what_the_separate_ones_did(kind):
    torch.manual_seed(0)
    model = Transformer(
        model_args_from_preset("tiny-gqa", vocab_size=256, dim=128, n_heads=4, n_kv_heads=2, multiple_of=64)
    ).eval()
    if kind != "none":
        model = quantize_model(model.to(torch.bfloat16), kind)
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        expected = model(tokens)
        fuse_projections(model)
        actual = model(tokens)
    assert model.layers[0].attention.wqkv is not None and model.layers[0].feed_forward.w13 is not None
    assert not hasattr(model.layers[0].attention, "wq")
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
