"""llama2's kernels on Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K (and Q2_K / Q3_K dequantization) against
gguf's numpy dequantizer, on random valid blocks; end to end on llama2's Q4_K_M of the default model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from llama2.errors import Llama2Error
from llama2.kernels import (
    cpu_capabilities,
    gguf_matmul_available,
    supported_isas,
    variant_ops,
)
from llama2.quant import GGUFLinear

from gguf_kernel_helpers import quantize_acts, quantize_acts_q8_k

pytestmark = pytest.mark.skipif(not gguf_matmul_available(), reason="llama2's kernels are off or do not build here")
ISAS = supported_isas(cpu_capabilities()) if gguf_matmul_available() else []

MATMUL_TYPES = [T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
DEQUANT_TYPES = [*MATMUL_TYPES, T.Q2_K, T.Q3_K]
# Per type: byte offsets of the fp16 fields of a block, the byte range of its integers (for
# the minimum's trick below), and a scale giving values of magnitude ~0.02 (a model's weights).
FP16_FIELDS = {
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
}
INTEGER_BYTES = {T.Q5_1: slice(4, 24), T.Q4_K: slice(16, 144), T.Q5_K: slice(16, 176)}  # the types with a minimum
TYPICAL_SCALE = {T.Q5_0: 3e-3, T.Q5_1: 1.5e-3, T.Q4_K: 1e-4, T.Q5_K: 5e-5, T.Q6_K: 2.5e-5, T.Q2_K: 2e-3, T.Q3_K: 8e-4}


def block_geometry(qtype: T) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[qtype]


def random_blocks(qtype: T, n: int, k: int, seed: int = 0, edge_scales: bool = False) -> np.ndarray:
    """[n, row bytes] random valid blocks: random integers and scale bytes, fp16 fields of either sign.

    edge_scales: fp16 fields drawn from every finite class (zero, subnormal, tiny, huge), not a model's range.
    """
    rng = np.random.default_rng(seed)
    values, size = block_geometry(qtype)
    raw = rng.integers(0, 256, size=(n, k // values, size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        if edge_scales:
            bits = rng.integers(0, 0x7C00, size=raw.shape[:2], dtype=np.uint16)  # finite magnitudes
            bits[..., ::5] &= 0x03FF  # subnormals (and zero)
            bits |= rng.integers(0, 2, size=raw.shape[:2], dtype=np.uint16) << 15
            half = bits.view(np.float16)
        else:
            half = (rng.standard_normal(raw.shape[:2]) * TYPICAL_SCALE[qtype]).astype(np.float16)
        raw[..., offset : offset + 2] = half[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def gguf_values(raw: np.ndarray, qtype: T) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32)


def ops(isa: str):
    return variant_ops(isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("edge_scales", [False, True], ids=["model-scales", "edge-scales"])
@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_rounded_to_bf16(qtype, edge_scales, isa):
    """Bit for bit (signed zeros included) gguf.quants' float32 values rounded once to bfloat16."""
    values = block_geometry(qtype)[0]
    n, k = 7, 3 * values
    raw = random_blocks(qtype, n, k, seed=int(qtype), edge_scales=edge_scales)
    expected = torch.from_numpy(gguf_values(raw, qtype)).reshape(n, k).to(torch.bfloat16)
    got = ops(isa).gguf_dequantize(torch.from_numpy(raw), int(qtype), n, k)
    assert got.dtype == torch.bfloat16 and got.shape == (n, k)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def reference_matmul(x: torch.Tensor, raw: np.ndarray, qtype: T, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N] float64 from gguf's values and the kernels' int8 activation blocks, a bound on fp32 rounding).

    The kernels compute with exact integers and fp32 sums, per block of 32 (Q5_0, Q5_1)
    m32 * fp32(d_x * sumq) + fp32(d32 * d_x) * isum, per super-block of 256 (Q4_K, Q5_K, Q6_K,
    activations quantized per 256 values exactly as llama.cpp's Q8_K) fp32(d * d_x) * S -
    fp32(dmin * d_x) * M; against the exact float64 product of the same quantized
    activations with gguf's fp32 values (themselves rounded once) that is a few fp32
    roundings of the terms' magnitudes per block. The magnitudes count the minimum apart
    from the scaled integers (they may cancel): gguf's values of the blocks with their
    integers zeroed are the minimums.
    """
    quantize = quantize_acts_q8_k if block_geometry(qtype)[0] == 256 else quantize_acts
    q, d = quantize(x.float().numpy())  # [M, nb, block], [M, nb]
    xq = torch.from_numpy(q.astype(np.float64) * d.astype(np.float64)[..., None]).reshape(x.shape[0], k)
    w = torch.from_numpy(gguf_values(raw, qtype)).double().reshape(n, k)
    minimum = torch.zeros_like(w)
    if qtype in INTEGER_BYTES:
        blocks = raw.reshape(-1, block_geometry(qtype)[1]).copy()
        blocks[:, INTEGER_BYTES[qtype]] = 0
        minimum = torch.from_numpy(gguf_values(blocks, qtype)).double().reshape(n, k)
    magnitude = xq.abs() @ ((w - minimum).abs() + minimum.abs()).T
    return xq @ w.T, (k // 32 + 32) * 2.0**-24 * magnitude


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 2, 17])
@pytest.mark.parametrize("k", [256, 1536], ids=str)
@pytest.mark.parametrize("qtype", MATMUL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_gguf_values_within_fp32_rounding(qtype, k, m, isa):
    n = 37
    raw = random_blocks(qtype, n, k, seed=k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, : block_geometry(qtype)[0]] = 0  # an all-zero activation block (K-quants: a whole super-block)
    y = ops(isa).gguf_matmul(x, torch.from_numpy(raw), int(qtype), n, k)
    expected, bound = reference_matmul(x, raw, qtype, n, k)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - expected).abs() <= bound).all()
    # The int8 activations' own error against the float product stays llama.cpp's ~1 %.
    exact = x.double() @ torch.from_numpy(gguf_values(raw, qtype)).double().reshape(n, k).T
    assert (y.double() - exact).norm() <= 0.02 * exact.norm()


@pytest.mark.parametrize("m", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("k", [256, 512, 2816], ids=str)
@pytest.mark.parametrize("qtype", MATMUL_TYPES, ids=lambda t: t.name)
def test_every_variant_equals_scalar_bitwise(qtype, k, m):
    """N = 13 (not a whole number of 4-row tiles), any M: the same bits from every variant."""
    n = 13
    raw = torch.from_numpy(random_blocks(qtype, n, k, seed=m))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m))
    expected = ops("scalar").gguf_matmul(x, raw, int(qtype), n, k)
    for isa in ISAS:
        assert torch.equal(ops(isa).gguf_matmul(x, raw, int(qtype), n, k), expected), isa


def test_rows_do_not_depend_on_the_batch():
    raw = torch.from_numpy(random_blocks(T.Q4_K, 9, 512))
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    together = torch.ops.llama2_kernels.gguf_matmul(x, raw, int(T.Q4_K), 9, 512)
    for i in range(5):
        assert torch.equal(torch.ops.llama2_kernels.gguf_matmul(x[i : i + 1], raw, int(T.Q4_K), 9, 512)[0], together[i])


def test_rows_that_are_not_whole_super_blocks_are_refused():
    raw = torch.from_numpy(random_blocks(T.Q4_K, 2, 512))
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.llama2_kernels.gguf_matmul(torch.randn(1, 576), raw, int(T.Q4_K), 2, 576)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.llama2_kernels.gguf_dequantize(raw, int(T.Q6_K), 2, 576)
    with pytest.raises(RuntimeError, match="needs"):
        torch.ops.llama2_kernels.gguf_matmul(torch.randn(1, 512), raw[:, :-1], int(T.Q4_K), 2, 512)
    with pytest.raises(Llama2Error, match="whole 256-value blocks"):
        GGUFLinear(torch.zeros(2 * 324, dtype=torch.uint8), "Q4_K", (2, 576))


@pytest.mark.parametrize("qtype", MATMUL_TYPES, ids=lambda t: t.name)
def test_gguf_linear_decode_and_prefill_agree(qtype):
    """A GGUFLinear of these types: decode rows through the kernel, prefill rows through the bf16 GEMM."""
    n, k = 40, 512
    raw = random_blocks(qtype, n, k, seed=3)
    layer = GGUFLinear(torch.from_numpy(raw), qtype.name, (n, k))
    values = torch.from_numpy(gguf_values(raw, qtype)).reshape(n, k)
    assert torch.equal(layer.dequantize(), values)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1))
    exact = x @ values.T
    for rows in (x[:3], x):  # 3 rows: the kernel; 40: the dequantized GEMM
        out = layer(rows)
        assert (out - exact[: len(rows)]).norm() <= 0.02 * exact[: len(rows)].norm()


def test_native_engine_runs_k_quant_models_like_the_modules(tmp_path, monkeypatch):
    """A tiny Llama whose projections are Q4_K, Q6_K and Q5_0 blocks: the engine (every variant,
    bitwise the same) against transformers on the blocks' values, within the modules' error."""
    import test_native

    def random_block_values(weight: torch.Tensor, type_name: str):
        qtype = T[type_name]
        raw = random_blocks(qtype, weight.shape[0], weight.shape[1], seed=weight.shape[0] + int(qtype))
        return raw, torch.from_numpy(gguf_values(raw, qtype)).reshape(weight.shape)

    monkeypatch.setattr(test_native, "block_values", random_block_values)
    test_native.test_engine_logits_match_transformers(tmp_path, ["Q4_K", "Q6_K", "Q5_0"], False, torch.float32, 64)


# --- end to end: a Q4_K_M of the default model made by llama.cpp's quantizer ------------------

KQUANT_FIXTURE = Path(__file__).parent / "fixtures" / "llamacpp_greedy_smollm2_q4_k_m.json"
TENSOR_HASHES = Path(__file__).parent / "fixtures" / "llamacpp_smollm2_q4_k_m_tensors.json"


def tensor_digests(path: Path) -> dict[str, dict[str, str]]:
    """GGUF tensor name -> {"type", "sha256" of its data}, as tools/make_kquant_model.py records them."""
    return {
        t.name: {"type": t.tensor_type.name, "sha256": hashlib.sha256(memoryview(t.data).cast("B")).hexdigest()}
        for t in gguf.GGUFReader(path).tensors
    }


@pytest.fixture(scope="module")
def q4_k_m_model(default_model_path, tmp_path_factory) -> tuple[Path, dict]:
    """(llama2's own Q4_K_M of the default model, llama.cpp's greedy tokens on llama.cpp's Q4_K_M of it).

    The file is written by `llama2 quantize --type q4_k_m` (the default model's Q4_1 values
    quantized by llama2's K-quant quantizer) and must hold, tensor for tensor, the types and
    bytes of the file llama.cpp's quantizer made (recorded hashes), so llama.cpp's tokens
    recorded on that file apply to it. LLAMA2_KQUANT_GGUF names another file to use instead
    (llama.cpp's own, checked by its SHA-256).
    """
    from llama2.weights.convert import convert

    fixture = json.loads(KQUANT_FIXTURE.read_text(encoding="utf-8"))
    override = os.environ.get("LLAMA2_KQUANT_GGUF")
    if override:
        path = Path(override)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == fixture["sha256"], f"{path} is not the fixture's file"
        return path, fixture
    path = convert(default_model_path, tmp_path_factory.mktemp("kquant") / "q4_k_m.gguf", "gguf", tensor_type="q4_k_m")
    recorded = json.loads(TENSOR_HASHES.read_text(encoding="utf-8"))["tensors"]
    ours = tensor_digests(path)
    assert ours.keys() == recorded.keys()
    differ = [name for name in recorded if ours[name] != recorded[name]]
    assert not differ, f"tensors whose type or bytes differ from llama.cpp's Q4_K_M: {differ}"
    return path, fixture


@pytest.mark.model
def test_q4_k_m_greedy_agrees_with_llama_cpp_in_every_variant(q4_k_m_model):
    """Teacher-forced decode steps through the native engine: >= 95% of llama.cpp's greedy tokens
    on the same blocks in the best variant this CPU runs, and every other variant gives the same
    logits bitwise on the first fixture case (the whole fixture per variant takes minutes on the
    scalar kernels; bitwise equality carries the agreement over)."""
    from test_default_model import stepwise_logits

    from llama2.generation import Llama
    from llama2.native import NativeForward

    path, fixture = q4_k_m_model
    llama = Llama.build(str(path), max_seq_len=1024, max_batch_size=1, device="cpu")
    kinds = {type(m).__name__ + ":" + getattr(m, "type_name", "") for m in llama.model.layers.modules()}
    assert {"GGUFLinear:Q4_K", "GGUFLinear:Q6_K", "GGUFLinear:Q5_0"} <= kinds  # the blocks as stored
    assert isinstance(llama.steps.decode_step, NativeForward)

    def teacher_forced_logits(isa: str, cases: list[dict]) -> list[torch.Tensor]:
        llama.model.setup_caches(1, 1024)
        forward = NativeForward(llama.model, isa=isa)
        with torch.inference_mode():
            return [stepwise_logits(forward, c["prompt_tokens"], c["continuation"], llama.device) for c in cases]

    best, *others = ISAS
    logits = teacher_forced_logits(best, fixture["cases"])
    agree = total = 0
    for case, case_logits in zip(fixture["cases"], logits, strict=True):
        agree += sum(a == b for a, b in zip(case_logits.argmax(-1).tolist(), case["continuation"], strict=True))
        total += len(case["continuation"])
    assert total > 500 and agree / total >= 0.95, f"{best}: agreement {agree}/{total} = {agree / total:.3f}"
    for isa in others:
        assert torch.equal(teacher_forced_logits(isa, fixture["cases"][:1])[0], logits[0]), isa
