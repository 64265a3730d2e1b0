"""The same code on CUDA: skipped without a GPU."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llama2.chat import Llama2ChatFormat
from llama2.config import model_args_from_preset
from llama2.generation import Llama, compile_model
from llama2.model import Transformer
from llama2.quant import Int4Linear, quantize_model, unpack_q4_blocks
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def random_model(seed: int = 0, max_seq_len: int = 256) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(model_args_from_preset("tiny-gqa", vocab_size=32000, max_seq_len=max_seq_len)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_cuda_logits_match_cpu_in_fp32():
    cpu = random_model()
    gpu = random_model().to("cuda")
    tokens = torch.randint(0, 32000, (2, 33))
    with torch.no_grad():
        expected = cpu(tokens)
        actual = gpu(tokens.cuda()).cpu()
    assert (expected - actual).abs().max() < 1e-3


def test_cuda_bf16_cached_decode_tracks_fp32():
    model = random_model().to("cuda", torch.bfloat16)
    reference = random_model().to("cuda")
    tokens = torch.randint(0, 32000, (1, 24), device="cuda")
    with torch.no_grad():
        expected = reference(tokens)[0, -1].float().log_softmax(-1)
        model.setup_caches(1, 64)
        model(tokens[:, :-1], torch.arange(23, device="cuda"))
        actual = model(tokens[:, -1:], torch.tensor([23], device="cuda"))[0, -1].float().log_softmax(-1)
    top = expected.topk(5).indices
    assert (expected[top] - actual[top]).abs().max() < 0.15


def test_greedy_generation_on_cuda_equals_cpu():
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    prompts = [tokenizer.encode(t, bos=True, eos=False) for t in ("Hello", "A longer prompt here")]
    outputs = []
    for device in ("cpu", "cuda"):
        model = random_model().to(device)
        llama = Llama(model, tokenizer, Llama2ChatFormat(tokenizer), max_seq_len=64, max_batch_size=2)
        outputs.append(llama.generate(prompts, max_gen_len=12, temperature=0, stop_ids=frozenset())[0])
    assert outputs[0] == outputs[1]


def test_seeded_sampling_on_cuda_is_reproducible():
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    llama = Llama(random_model().cuda(), tokenizer, None, max_seq_len=64, max_batch_size=1)
    prompt = [tokenizer.encode("Once", bos=True, eos=False)]
    first = llama.generate(prompt, max_gen_len=10, temperature=1.0, seed=5, stop_ids=frozenset())[0]
    second = llama.generate(prompt, max_gen_len=10, temperature=1.0, seed=5, stop_ids=frozenset())[0]
    assert first == second


def test_compiled_cuda_graph_decode_equals_eager():
    """torch.compile with CUDA graphs, the cache length crossing a bucket boundary (256)."""
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    prompt = [torch.randint(3, 32000, (250,), generator=torch.Generator().manual_seed(1)).tolist()]
    outputs = []
    for compile in (False, True):
        model = random_model(max_seq_len=400).cuda()
        llama = Llama(model, tokenizer, None, max_seq_len=400, max_batch_size=1, compile=compile)
        outputs.append(llama.generate(prompt, max_gen_len=12, temperature=0, stop_ids=frozenset())[0])
    assert outputs[0] == outputs[1]


def test_int4_layer_on_cuda_matches_its_weight():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    cpu = Int4Linear.from_float(weight)
    gpu = Int4Linear.from_float(weight.cuda())
    assert torch.allclose(gpu.dequantize().cpu(), cpu.dequantize(), atol=2e-2, rtol=1e-2)  # bf16 rounding
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    expected = x.float() @ cpu.dequantize().T
    actual = gpu(x.cuda()).float().cpu()
    assert (actual - expected).abs().max() <= 0.02 * expected.abs().max()


def test_int4_values_on_cuda_come_back_exactly_and_fuse_to_ggufs_rows():
    """tinygemm's layout is never read either: the values come back through its matmul, as on the CPU."""
    blocks = quantize(np.random.default_rng(0).standard_normal((80, 256)).astype(np.float32), GGMLQuantizationType.Q4_1)
    reference = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1))
    q, scale, minimum = unpack_q4_blocks(torch.from_numpy(blocks), (80, 256), has_minimum=True)
    cpu = Int4Linear.from_q4_blocks(q, scale, minimum)
    gpu = Int4Linear.from_q4_blocks(q.cuda(), scale.cuda(), minimum.cuda())
    assert torch.equal(gpu.codes().cpu(), q)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
    fused = Int4Linear.concat([gpu, gpu])
    expected = torch.cat([reference, reference])
    assert ((fused.dequantize().cpu() - expected).norm() / expected.norm()).item() < 5e-3  # bf16 scales
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    out, want = fused(x.cuda()).float().cpu(), x.float() @ expected.T
    assert ((out - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_compiled_decode_on_cuda_equals_eager(kind):
    model = quantize_model(random_model().to("cuda", torch.bfloat16), kind)
    tokens = torch.randint(0, 32000, (1, 24), device="cuda")
    last, position = tokens[:, -1:], torch.tensor([23], device="cuda")
    with torch.no_grad():
        model.setup_caches(1, 64)
        model(tokens[:, :-1], torch.arange(23, device="cuda"))
        expected = model(last, position, kv_len=64)[0, -1]
        step = compile_model(model)
        for _ in range(3):  # CUDA graphs are recorded on a later call than the first
            actual = step(last, position, kv_len=64)[0, -1]
    assert (expected - actual).abs().max() <= 0.02 * expected.abs().max()  # bf16 sums in another order
