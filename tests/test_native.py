"""The native C++ engine (llama2.native) against transformers' Llama on the same block values."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from llama2.fuse import fuse_projections
from llama2.kernels import cpu_capabilities, gguf_matmul_available, requested_isa, supported_isas
from llama2.native import NativeForward, native_engine_supports
from llama2.quant import GGUFLinear
from llama2.weights import open_checkpoint

from helpers import make_hf_llama, our_model, random_tokens, reference_logits

QTYPES = ("Q4_0", "Q4_1", "Q8_0")
PROJECTIONS = (
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)

pytestmark = pytest.mark.skipif(not gguf_matmul_available(), reason="llama2's kernels do not build here")
# Every kernel variant this CPU runs (scalar, avx2, ...), the one in use first.
ISAS = (
    sorted(supported_isas(cpu_capabilities()), key=lambda isa: isa != requested_isa())
    if gguf_matmul_available()
    else []
)


def block_values(weight: torch.Tensor, type_name: str) -> tuple[np.ndarray, torch.Tensor]:
    """(GGUF blocks of `weight` quantized by gguf, the values those blocks hold)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = gguf.quants.quantize(weight.numpy(), qtype)
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, qtype))


def engine_pair(tmp_path, type_names: list[str], fused: bool, head_dim: int = 32):
    """(transformers model whose projections hold GGUF block values, our model on those blocks).

    Projection k of every layer is quantized as type_names[k % len(type_names)]. Our
    model's q/k rows are permuted for Meta's RoPE layout; GGUF rows are independent
    blocks, so our blocks are the reference's block rows in our row order (found by
    matching the values).
    """
    hf = make_hf_llama(tmp_path, gqa=True, hidden_size=4 * head_dim, num_heads=4, intermediate_size=256, vocab_size=160)
    hf_blocks = {}
    hf_names = {
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w2": "mlp.down_proj",
        "feed_forward.w3": "mlp.up_proj",
    }
    with torch.no_grad():
        for layer_index, layer in enumerate(hf.model.layers):
            for k, name in enumerate(PROJECTIONS):
                linear = layer.get_submodule(hf_names[name])
                blocks, values = block_values(linear.weight, type_names[k % len(type_names)])
                linear.weight.copy_(values)
                hf_blocks[layer_index, name] = (blocks, type_names[k % len(type_names)])
    hf.save_pretrained(tmp_path)
    ours = our_model(open_checkpoint(tmp_path))
    for (layer_index, name), (blocks, type_name) in hf_blocks.items():
        parent, attr = name.split(".")
        owner = ours.layers[layer_index].get_submodule(parent)
        weight = getattr(owner, attr).weight.detach()
        hf_rows = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[type_name]))
        order = [int((hf_rows == row).all(dim=1).nonzero()[0]) for row in weight]  # our row i = reference row order[i]
        setattr(owner, attr, GGUFLinear(torch.from_numpy(blocks[order]), type_name, tuple(weight.shape)))
    return hf, fuse_projections(ours) if fused else ours


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize(
    ("cache_dtype", "head_dim"),
    [(torch.float32, 32), (torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128)],
    ids=str,
)
@pytest.mark.parametrize(
    ("type_names", "fused"),
    [(["Q4_0"], True), (["Q4_1"], True), (["Q8_0"], True), (QTYPES, False)],
    ids=["Q4_0", "Q4_1", "Q8_0", "mixed-unfused"],
)
def test_engine_logits_match_transformers(tmp_path, type_names, fused, cache_dtype, head_dim):
    """Prefill chunks (key loop, matmul attention, bf16 GEMM), then decode steps, against transformers.

    The engine quantizes activations to int8 per block of 32 for its matmuls (as llama.cpp
    does), so the logits are close, not equal; the yardstick for that noise is the
    PyTorch modules' error on the same blocks (they use the same kernels, with bfloat16
    GEMMs for long chunks): 3-4% at head_dim 32-64, ~9% at 128 (this random model's
    activations grow with its width). A wrong layout (RoPE pairs, heads, cache positions)
    would be off by the size of the logits themselves. Every kernel variant gives the
    engine's logits bitwise.
    """
    hf, model = engine_pair(tmp_path, list(type_names), fused, head_dim)  # 64 and 128: SmolLM2's and Llama 2's
    tokens = random_tokens(160, batch=1, length=56, seed=3)
    expected = reference_logits(hf, tokens)[0]  # [T, vocab]
    chunks = [(0, 8), (8, 48)] + [(t, t + 1) for t in range(48, 56)]  # 8 rows: kernel + key loop; 40: GEMM + matmuls
    errors, engine_logits = {}, {}
    for name in ("modules", *ISAS):
        model.setup_caches(1, 64, dtype=cache_dtype)
        forward = model if name == "modules" else NativeForward(model, isa=name)
        with torch.inference_mode():
            logits = torch.cat([forward(tokens[:, a:b], torch.arange(a, b), kv_len=b)[0] for a, b in chunks])
        assert logits.shape == expected.shape
        errors[name] = relative_error(logits, expected)
        if name != "modules":
            engine_logits[name] = logits
    engine = engine_logits[ISAS[0]]  # the variant in use
    assert errors[ISAS[0]] < min(0.12, 1.25 * errors["modules"] + 0.01), errors
    assert (engine.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    for isa, logits in engine_logits.items():
        assert torch.equal(logits, engine), isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head", ["float", "gguf"])
def test_batch_rows_are_computed_alone_in_their_cache_slots(tmp_path, head, isa):
    """Decode rows of a batch (any cache slots, different lengths) equal the same rows run alone, bitwise."""
    hf, model = engine_pair(tmp_path, ["Q8_0"], True)
    if head == "gguf":  # the output head as Q8_0 blocks too (its kernel's rows do not depend on the batch)
        blocks, values = block_values(model.output.weight.detach(), "Q8_0")
        model.output = GGUFLinear(torch.from_numpy(blocks), "Q8_0", tuple(values.shape))
    model.setup_caches(2, 32)
    calls = []

    def fallback(tokens, input_pos, **options):
        calls.append(sorted(options))
        return model(tokens, input_pos, **options)

    native = NativeForward(model, fallback=fallback, isa=isa)
    tokens = random_tokens(160, batch=2, length=12, seed=5)
    lengths = (11, 7)  # prompt lengths of the two rows; then one decode step each
    slots = torch.tensor([1, 0])
    with torch.inference_mode():
        alone = []
        for i, n in enumerate(lengths):
            native(tokens[i : i + 1, :n], torch.arange(n), kv_len=n)
            alone.append(native(tokens[i : i + 1, n : n + 1], torch.tensor([n]), kv_len=n + 1)[0, 0])
        for i, n in enumerate(lengths):  # prompts in swapped slots
            native(tokens[i : i + 1, :n], torch.arange(n), cache_slots=slots[i : i + 1], kv_len=n)
        step_tokens = torch.stack([tokens[i, n : n + 1] for i, n in enumerate(lengths)])  # [2, 1]
        step = native(
            step_tokens, torch.tensor([[n] for n in lengths]), cache_slots=slots, kv_len=[n + 1 for n in lengths]
        )
    assert step.shape == (2, 1, 160) and not calls
    assert torch.equal(step[:, 0], torch.stack(alone))
    expected = reference_logits(hf, tokens)
    for i, n in enumerate(lengths):
        assert relative_error(step[i, 0], expected[i, n]) < 0.045
    with torch.inference_mode():
        native(tokens, torch.arange(12), kv_len=12, document_ids=torch.zeros(2, 12, dtype=torch.long))
    assert calls == [["cache_slots", "document_ids", "kv_len", "last_logits_only"]]


def test_engine_follows_new_caches_and_refuses_bad_input(tmp_path):
    _, model = engine_pair(tmp_path, ["Q4_0"], True)
    assert not native_engine_supports(model)  # no caches yet
    with pytest.raises(ValueError, match="GGUF block layers"):
        NativeForward(model)
    model.setup_caches(1, 16)
    native = NativeForward(model)
    plain = our_model(open_checkpoint(tmp_path))
    plain.setup_caches(1, 16)
    assert not native_engine_supports(plain)  # float projections
    model.setup_caches(1, 24)  # new buffers: the engine follows them
    with torch.inference_mode():
        native(torch.zeros(1, 4, dtype=torch.long), torch.arange(18, 22), kv_len=22)
    assert model.layers[0].attention.kv_cache.k[0, :, 18:22].abs().sum() > 0
    with pytest.raises(RuntimeError, match="exceeds the cache of 24"):
        native(torch.zeros(1, 4, dtype=torch.long), torch.arange(22, 26), kv_len=26)
    model.setup_caches(1, 16)
    with pytest.raises(RuntimeError, match="exceeds the cache of 16"):
        native(torch.zeros(1, 4, dtype=torch.long), torch.arange(14, 18), kv_len=18)
