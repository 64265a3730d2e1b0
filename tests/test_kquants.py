"""llama2's K-quant quantizer against llama.cpp's (recorded blocks) and gguf's dequantizer, and
llama.cpp's Q4_K_M / Q5_K_M tensor-type mix."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llama2.errors import Llama2Error
from llama2.weights.kquants import quantize
from llama2.weights.quant_mix import mixed_type, use_more_bits

FIXTURE = Path(__file__).parent / "fixtures" / "llamacpp_kquant_blocks.npz"
K_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    """Rows and llama.cpp's blocks of them (tools/record_llamacpp_kquants.py)."""
    with np.load(FIXTURE) as data:
        return {name: data[name] for name in data.files}


@pytest.mark.parametrize("qtype", [*K_TYPES, T.Q5_0, T.Q5_1, T.Q8_0])
def test_blocks_equal_llama_cpps_quantizer(recorded, qtype):
    """Every recorded row (model-like weights, zeros, constants, outliers, one-signed rows, ...)
    gives llama.cpp's bytes: the K types by our quantizer, the fallbacks by gguf's."""
    ours = quantize(recorded["rows"], qtype)
    differ = (ours != recorded[qtype.name]).any(axis=-1)
    assert not differ.any(), f"{qtype.name}: rows of {sorted(set(recorded['case'][differ]))} differ"


STEP_BOUNDS = [(T.Q4_K, 15, 0.08), (T.Q5_K, 31, 0.04), (T.Q6_K, 63, 0.02)]  # type, levels, relative RMS error


@pytest.mark.parametrize(("qtype", "levels", "max_relative_rms"), STEP_BOUNDS)
def test_gguf_dequantizes_our_blocks_within_the_step(qtype, levels, max_relative_rms):
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((32, 1024)) * 0.02).astype(np.float32)
    restored = gguf.quants.dequantize(quantize(values, qtype), qtype)
    error = restored - values
    assert np.sqrt(np.mean(error**2) / np.mean(values**2)) < max_relative_rms
    sub_blocks = values.reshape(-1, 32)
    spread = sub_blocks.max(axis=1) - np.minimum(sub_blocks.min(axis=1), 0)  # the range a minimum-type block spans
    assert (np.abs(error).reshape(-1, 32).max(axis=1) <= 1.5 * spread / levels).all()


def test_shapes_and_bad_input():
    values = np.zeros((3, 2, 512), dtype=np.float32)
    assert quantize(values, T.Q4_K).shape == (3, 2, 2 * 144)
    with pytest.raises(Llama2Error, match="multiple of 256"):
        quantize(np.zeros((2, 288), dtype=np.float32), T.Q6_K)
    with pytest.raises(Llama2Error, match="non-finite"):
        quantize(np.full((1, 256), np.nan, dtype=np.float32), T.Q5_K)


# --- the Q4_K_M / Q5_K_M mix -------------------------------------------------------------------


def test_more_bits_layers_of_llama_2_7b():
    """32 layers: the first and last four, and every third layer between, starting at layer 6."""
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize(("mix", "base"), [("q4_k_m", T.Q4_K), ("q5_k_m", T.Q5_K)])
def test_mix_of_llama_2_7b(mix, base):
    def kind(name, shape):
        return mixed_type(name, shape, mix, 32, tied=False)

    assert kind("output_norm.weight", [4096]) == T.F32
    assert kind("token_embd.weight", [32000, 4096]) == base
    assert kind("output.weight", [32000, 4096]) == T.Q6_K
    for layer, more in [(0, True), (4, False), (6, True), (7, False), (31, True)]:
        assert kind(f"blk.{layer}.attn_v.weight", [4096, 4096]) == (T.Q6_K if more else base)
        assert kind(f"blk.{layer}.ffn_down.weight", [4096, 11008]) == (T.Q6_K if more else base)
        for role in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert kind(f"blk.{layer}.{role}.weight", [4096, 4096]) == base


def test_mix_fallbacks_for_rows_that_are_not_super_blocks():
    """SmolLM2-135M (width 576, tied embeddings) as llama.cpp quantizes it to Q4_K_M."""

    def kind(name, shape, mix="q4_k_m"):
        return mixed_type(name, shape, mix, 30, tied=True, grouped_query=True)

    assert kind("token_embd.weight", [49152, 576]) == T.Q8_0
    assert kind("blk.0.attn_q.weight", [576, 576]) == T.Q5_0
    assert kind("blk.0.attn_q.weight", [576, 576], "q5_k_m") == T.Q5_1
    assert kind("blk.0.attn_v.weight", [192, 576]) == T.Q8_0  # Q6_K -> Q8_0
    assert kind("blk.4.attn_v.weight", [192, 576]) == T.Q5_0
    assert kind("blk.0.ffn_down.weight", [576, 1536]) == T.Q6_K
    assert kind("blk.4.ffn_down.weight", [576, 1536]) == T.Q4_K
    assert kind("blk.4.ffn_up.weight", [1536, 100]) == T.F16  # not even whole blocks of 32


def test_mix_of_llama_2_70b_gives_attn_v_q5_k():
    """Layer 11 of 80 is not a "more bits" layer (the first tenth is)."""
    assert mixed_type("blk.11.attn_v.weight", [1024, 8192], "q4_k_m", 80, tied=False, grouped_query=True) == T.Q5_K
    assert mixed_type("blk.11.attn_v.weight", [1024, 8192], "q5_k_m", 80, tied=False, grouped_query=True) == T.Q5_K
    assert mixed_type("blk.11.attn_v.weight", [8192, 8192], "q4_k_m", 80, tied=False) == T.Q4_K  # 65B: no GQA


def test_unknown_mix():
    with pytest.raises(Llama2Error, match="unknown quantization mix"):
        mixed_type("blk.0.attn_q.weight", [256, 256], "q3_k_m", 1, tied=False)
