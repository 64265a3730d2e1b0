"""The torch GGML dequantizers against gguf-py's numpy reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from llama2.errors import Llama2Error
from llama2.weights.dequant import TORCH_TYPES, block_size_bytes, dequantize, has_torch_dequantizer, tensor_nbytes

T = GGMLQuantizationType

# Byte offsets of the fp16 scale fields inside one block of each type.
FP16_FIELDS = {
    T.F16: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
QUANTIZABLE = [T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
ROWS = 4
BLOCKS_PER_ROW = 16

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
)


def random_blocks(qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random block bytes [ROWS, row bytes] whose fp16 fields are finite."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(ROWS * BLOCKS_PER_ROW, type_size), dtype=np.uint8)
    if qtype == T.F32:
        blocks = rng.standard_normal(blocks.shape[0], dtype=np.float32).reshape(-1, 1).view(np.uint8)
    elif qtype == T.BF16:
        blocks = gguf_quants.quantize(rng.standard_normal(blocks.shape[0], dtype=np.float32), qtype).reshape(-1, 2)
    for offset in FP16_FIELDS.get(qtype, []):
        scale = rng.uniform(-3.0, 3.0, size=(blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8)
    return blocks.reshape(ROWS, -1)


def quantized_floats(qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random floats [ROWS, values] quantized by gguf: realistic block bytes."""
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((ROWS, BLOCKS_PER_ROW * block_size), dtype=np.float32)
    values[0, :block_size] = 0.0  # an all-zero block (zero scale)
    return gguf_quants.quantize(values, qtype)


def check_against_gguf(data: np.ndarray, qtype: GGMLQuantizationType, device: str) -> None:
    expected = torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(data, qtype), dtype=np.float32))
    assert not expected.isnan().any()
    raw = torch.from_numpy(data.view(np.uint8)).to(device)
    actual = dequantize(raw, qtype, expected.shape)
    assert actual.dtype == torch.float32
    assert actual.device.type == device
    assert torch.equal(actual.cpu(), expected)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("qtype", TORCH_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype, device):
    for seed in range(3):
        check_against_gguf(random_blocks(qtype, seed), qtype, device)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_gguf(qtype, device):
    check_against_gguf(quantized_floats(qtype, seed=7), qtype, device)


def test_every_listed_type_has_a_torch_dequantizer():
    expected = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    assert expected <= set(TORCH_TYPES)
    assert all(has_torch_dequantizer(t) for t in expected)


def test_other_types_fall_back_to_gguf():
    qtype = T.TQ2_0
    assert not has_torch_dequantizer(qtype)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    values = np.random.default_rng(0).standard_normal((2, block_size), dtype=np.float32)
    check_against_gguf(gguf_quants.quantize(values, qtype), qtype, "cpu")


def test_input_is_not_modified_and_output_is_not_shared():
    data = random_blocks(T.F32, seed=0)
    raw = torch.from_numpy(data.copy())
    out = dequantize(raw, T.F32, (ROWS, data.shape[1] // 4))
    out.fill_(0.0)
    assert torch.equal(raw, torch.from_numpy(data))


def test_accepts_plain_int_type_and_any_raw_shape():
    data = quantized_floats(T.Q8_0, seed=1)
    expected = torch.from_numpy(gguf_quants.dequantize(data, T.Q8_0))
    actual = dequantize(torch.from_numpy(data.reshape(-1)), int(T.Q8_0), tuple(expected.shape))
    assert torch.equal(actual, expected)


def test_block_geometry():
    assert block_size_bytes(T.Q4_1) == (32, 20)
    assert block_size_bytes(T.Q6_K) == (256, 210)
    assert block_size_bytes(T.F32) == (1, 4)
    assert tensor_nbytes(T.Q8_0, (3, 64)) == 3 * 2 * 34


@pytest.mark.parametrize(
    "raw, qtype, shape, message",
    [
        (torch.zeros(36, dtype=torch.uint8), T.Q8_0, (64,), "needs 68 bytes"),
        (torch.zeros(34, dtype=torch.uint8), T.Q8_0, (2, 16), "not a multiple of its block size 32"),
        (torch.zeros(4, dtype=torch.float32), T.F32, (4,), "raw uint8"),
        (torch.zeros(4, dtype=torch.uint8), T.I8, (4,), "cannot dequantize GGML type I8"),
        (torch.zeros(4, dtype=torch.uint8), 12345, (4,), "unknown GGML tensor type"),
    ],
)
def test_bad_input_raises(raw, qtype, shape, message):
    with pytest.raises(Llama2Error, match=message):
        dequantize(raw, qtype, shape)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_decoding_in_several_chunks_matches(qtype, monkeypatch):
    from llama2.weights import dequant

    monkeypatch.setattr(dequant, "_CHUNK_VALUES", 3 * GGML_QUANT_SIZES[qtype][0])  # 3 blocks per step
    check_against_gguf(random_blocks(qtype, seed=5), qtype, "cpu")
