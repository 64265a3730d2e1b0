"""Packed weight-only quantized linears against independent dequantization (gguf's own)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llama2.config import model_args_from_preset
from llama2.errors import Llama2Error
from llama2.fuse import fuse_projections
from llama2.kernels import gguf_matmul_available
from llama2.model import Transformer
from llama2.quant import GGUFLinear, Int4Linear, Int8Linear, int8_from_gguf, pack_int4, quantize_model, unpack_int4pack, unpack_q4_blocks


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_int4_from_gguf_blocks_computes_gguf_dequantized_weights(qtype):
    torch.manual_seed(0)
    weight = np.random.default_rng(0).standard_normal((96, 256)).astype(np.float32)
    blocks = quantize(weight, qtype)  # uint8 [96, bytes per row]
    reference = torch.from_numpy(dequantize(blocks, qtype))  # gguf's decode of the same blocks
    q, scale, minimum = unpack_q4_blocks(torch.from_numpy(blocks), (96, 256), qtype == GGMLQuantizationType.Q4_1)
    layer = Int4Linear.from_q4_blocks(q, scale, minimum)
    x = torch.randn(5, 256)
    expected = x.to(torch.bfloat16).float() @ reference.T
    assert relative_error(layer(x), expected) < 1e-2  # bf16 activations, scales and output
    assert relative_error(layer.dequantize(), reference) < 5e-3


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


@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (192, 576), (1536, 576), (96, 64), (80, 128), (32, 64)])
def test_unpack_int4pack_inverts_pytorchs_packer(out_features, in_features):
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    assert torch.equal(unpack_int4pack(packed, out_features, in_features).int(), q)
    assert torch.equal(pack_int4(q.to(torch.uint8), rows_per_chunk=64), packed)  # chunked packing, same layout


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


@pytest.mark.parametrize(("kind", "block_type", "stock_layer"), [("int4", "Q4_0", Int4Linear), ("int8", "Q8_0", Int8Linear)])
def test_quantize_command_then_packed_loading(tmp_path, kind, block_type, stock_layer):
    """`llama2 quantize` writes a GGUF whose blocks load packed and compute what the dequantized file does."""
    import shutil

    from helpers import make_hf_llama

    from llama2.cli import main
    from llama2.generation import Llama
    from llama2.tokenizer import llama2_tokenizer_path

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
    model = Transformer(model_args_from_preset("tiny-gqa", vocab_size=256, dim=128, n_heads=4, n_kv_heads=2, multiple_of=64)).eval()
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


def test_int4_layers_with_a_partial_row_block_in_front_stay_apart():
    layers = [Int4Linear.from_float(torch.randn(n, 64)) for n in (48, 64)]
    assert Int4Linear.concat(layers) is None
    assert Int4Linear.concat(layers[::-1]).dequantize().equal(torch.cat([layers[1].dequantize(), layers[0].dequantize()]))
