"""llama2's GGUF kernels against gguf's own dequantizer and an exact emulation of their arithmetic."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from llama2.fuse import concat_layers
from llama2.kernels import cpu_capabilities, gguf_matmul_available, supported_isas, variant_ops
from llama2.quant import GGUFLinear

from gguf_kernel_helpers import BLOCK_BYTES, NAMES, Q4_0, Q4_1, Q8_0, dequantize, emulate, make_weight, quantize_acts

pytestmark = pytest.mark.skipif(not gguf_matmul_available(), reason="llama2's kernels are off or do not build here")
# Every kernel variant this CPU runs (scalar, avx2, ...): each test below runs on each.
ISAS = supported_isas(cpu_capabilities()) if gguf_matmul_available() else []
by_isa = pytest.mark.parametrize("isa", ISAS)  # the top decorator: the fastest-varying parameter

QTYPES = [Q4_0, Q4_1, Q8_0]
MODEL_SHAPES = [(192, 576), (960, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M's projections
BIG_SHAPES = [(49152, 576), (4096, 4096), (11008, 4096), (4096, 11008)]  # its head, Llama-2-7B's projections
ODD_SHAPES = [(5, 32), (7, 96), (33, 544), (61, 1056)]  # odd block counts, rows not a multiple of a tile
BIG = 4096 * 4096


def gguf_matmul(x, raw, qtype, n, k, isa=None):
    ops = torch.ops.llama2_kernels if isa is None else variant_ops(isa)
    return ops.gguf_matmul(x, raw, qtype, n, k)


def random_blocks(qtype: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid blocks with random contents and fp16 scales (and minimums) of either sign: fast for big shapes."""
    rng = np.random.default_rng(seed)
    blocks, size = k // 32, BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, size=(n, blocks, size), dtype=np.uint8)
    scales = (rng.standard_normal((n, blocks, 2), dtype=np.float32) * 0.01).astype(np.float16)
    raw[..., 0:2] = scales[..., 0:1].view(np.uint8)
    if qtype == Q4_1:
        raw[..., 2:4] = scales[..., 1:2].view(np.uint8)
    return raw.reshape(n, blocks * size)


@functools.lru_cache(maxsize=2)
def weight(qtype: int, n: int, k: int):
    """(raw uint8 numpy, raw tensor, gguf's dequantization as fp32 [N, K])."""
    raw = make_weight(qtype, n, k) if n * k < BIG else random_blocks(qtype, n, k)
    return raw, torch.from_numpy(raw), torch.from_numpy(dequantize(raw, qtype))


def check(isa, qtype, n, k, m, dtype=torch.float32, seed=0):
    raw_np, raw, w = weight(qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = gguf_matmul(x, raw, qtype, n, k, isa)
    assert y.shape == (m, n) and y.dtype == dtype
    # Against the float product with gguf's values: only the int8 activations' error (~0.5-1 %).
    reference = x.float() @ w.T
    err = (y.float() - reference).abs()
    assert err.max() <= 0.02 * reference.abs().max()
    assert err.mean() <= 0.01 * reference.abs().mean()
    # Against the exact emulation: only the order of fp32 additions may differ.
    exact, bound = emulate(x, raw_np, qtype, n, k)
    if dtype == torch.float32:
        assert ((y.double() - exact).abs() <= bound).all()
    else:  # then rounded once more, to x's dtype
        ulp = exact.to(dtype).double().abs() * 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        low, high = (exact - bound).to(dtype).double() - ulp, (exact + bound).to(dtype).double() + ulp
        assert ((y.double() >= low) & (y.double() <= high)).all()


@by_isa
@pytest.mark.parametrize("m", [1, 2, 17])
@pytest.mark.parametrize("n,k", MODEL_SHAPES + ODD_SHAPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES, ids=NAMES.get)
def test_matmul_matches_gguf_values_and_exact_arithmetic(isa, qtype, n, k, m):
    check(isa, qtype, n, k, m)


@pytest.mark.parametrize("m", [1, 2, 17])
@pytest.mark.parametrize("n,k", BIG_SHAPES, ids=str)
@pytest.mark.parametrize("qtype", QTYPES, ids=NAMES.get)
def test_big_matmuls_match_gguf_values_and_exact_arithmetic(qtype, n, k, m):
    """The variant in use (the others equal it bitwise: test_every_variant_equals_scalar_bitwise)."""
    check(None, qtype, n, k, m)


@by_isa
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 64, 100])
@pytest.mark.parametrize("qtype", QTYPES, ids=NAMES.get)
def test_half_precision_activations_and_prefill_rows(isa, qtype, m, dtype):
    check(isa, qtype, 576, 1536, m, dtype)
    check(isa, qtype, 61, 1056, m, dtype)


@pytest.mark.parametrize("m", [1, 2, 3, 16, 17, 64])
@pytest.mark.parametrize(
    "n,k", [(192, 576), (61, 1056), (7, 96), (3, 192), (5, 416), (33, 544), (5, 32), (64, 4096)], ids=str
)
@pytest.mark.parametrize("qtype", QTYPES, ids=NAMES.get)
def test_every_variant_equals_scalar_bitwise(qtype, n, k, m):
    """The same bits from every variant: exact integer block sums, one float order (k: 1 to 128 blocks,
    last groups of every size class: 1, 2, 3, 6, 13 and 16 blocks)."""
    _, raw, _ = weight(qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, :32] = 0  # an all-zero activation block
    expected = gguf_matmul(x, raw, qtype, n, k, "scalar")
    for isa in ISAS:
        assert torch.equal(gguf_matmul(x, raw, qtype, n, k, isa), expected), isa
        assert torch.equal(
            variant_ops(isa).gguf_dequantize(raw, qtype, n, k), variant_ops("scalar").gguf_dequantize(raw, qtype, n, k)
        ), isa


@by_isa
def test_activations_are_quantized_like_llama_cpp_q8_0_with_fp32_scales(isa):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((7, 1056), dtype=np.float32))
    x[0, :32] = 0  # an all-zero block: d = 0, q = 0
    x[1, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [0.0] * 25)  # ties, d = 1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, d = variant_ops(isa).gguf_quantize_rows(x.to(dtype))
        q_ref, d_ref = quantize_acts(x.to(dtype).float().numpy())
        np.testing.assert_array_equal(q.numpy(), q_ref.reshape(q.shape))
        np.testing.assert_array_equal(d.numpy(), d_ref)
    q, _ = variant_ops(isa).gguf_quantize_rows(x)
    assert q[1, :7].tolist() == [127, 0, 2, 2, 0, -2, -2]  # round half to even
    assert q[0, :32].abs().sum() == 0


@by_isa
@pytest.mark.parametrize("qtype", QTYPES, ids=NAMES.get)
def test_dequantize_equals_gguf_rounded_to_bf16(isa, qtype):
    raw_np, raw, w = weight(qtype, 61, 1056)
    got = variant_ops(isa).gguf_dequantize(raw, qtype, 61, 1056)
    assert got.dtype == torch.bfloat16 and torch.equal(got, w.to(torch.bfloat16))


@by_isa
@pytest.mark.parametrize("qtype", QTYPES, ids=NAMES.get)
def test_rows_do_not_depend_on_the_batch(isa, qtype):
    """Every batch size a decode step of 1..16 sequences uses gives each row bitwise its result alone
    (k = 576: a full group of 16 blocks and a partial one; 1056: 33 blocks)."""
    for n, k in ((61, 576), (33, 1056)):
        _, raw, _ = weight(qtype, n, k)
        x = torch.randn(16, k, generator=torch.Generator().manual_seed(k))
        alone = torch.cat([gguf_matmul(x[m : m + 1], raw, qtype, n, k, isa) for m in range(16)])
        for rows in range(2, 17):
            assert torch.equal(gguf_matmul(x[:rows], raw, qtype, n, k, isa), alone[:rows]), rows


def test_leading_dims_non_contiguous_and_empty_inputs():
    _, raw, _ = weight(Q4_1, 192, 576)
    x = torch.randn(2, 3, 576)
    y = gguf_matmul(x, raw, Q4_1, 192, 576)
    assert y.shape == (2, 3, 192)
    torch.testing.assert_close(y.reshape(6, 192), gguf_matmul(x.reshape(6, 576), raw, Q4_1, 192, 576))
    transposed = torch.randn(576, 4).T
    torch.testing.assert_close(
        gguf_matmul(transposed, raw, Q4_1, 192, 576), gguf_matmul(transposed.contiguous(), raw, Q4_1, 192, 576)
    )
    assert gguf_matmul(torch.randn(0, 576), raw, Q4_1, 192, 576).shape == (0, 192)


def test_bad_arguments_are_refused_with_a_message():
    _, raw, _ = weight(Q4_0, 192, 576)
    with pytest.raises(RuntimeError, match="raw has"):
        gguf_matmul(torch.randn(1, 576), raw, Q4_1, 192, 576)
    with pytest.raises(RuntimeError, match="last dimension"):
        gguf_matmul(torch.randn(1, 544), raw, Q4_0, 192, 576)
    with pytest.raises(RuntimeError, match="unsupported qtype"):
        gguf_matmul(torch.randn(1, 576), raw, 10, 192, 576)  # Q2_K: dequantized only
    with pytest.raises(RuntimeError, match="raw has"):
        torch.ops.llama2_kernels.gguf_dequantize(raw, Q4_1, 192, 576)


def test_gguf_linear_layers_concatenate_and_compile():
    layers = [GGUFLinear(weight(Q4_1, n, 576)[1], "Q4_1", (n, 576)) for n in (192, 576)]
    fused = concat_layers(layers)
    x = torch.randn(1, 3, 576, dtype=torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))
    compiled = torch.compile(lambda h: torch.nn.functional.silu(fused(h)), fullgraph=True)
    for rows in (1, 3, 40):  # decode (kernel) and prefill (bf16 weights) shapes
        h = torch.randn(1, rows, 576, dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(h), torch.nn.functional.silu(fused(h)), rtol=2e-2, atol=1e-3)
