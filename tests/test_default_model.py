"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) against llama.cpp's recorded outputs."""

import json
from pathlib import Path

import pytest
import torch

from llama2.generation import Llama
from llama2.native import NativeForward

FIXTURE = Path(__file__).parent / "fixtures" / "llamacpp_greedy_smollm2.json"
HELDOUT_TEXT = Path(__file__).parent / "fixtures" / "heldout.txt"  # written for this test, never trained on

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def llama(default_model_path):
    """The exact path: every weight dequantized to float32."""
    return Llama.build(default_model_path, max_seq_len=1024, max_batch_size=4, device="cpu", quant="none")


@pytest.fixture(scope="module")
def fast_llama(default_model_path):
    """The default CPU path: the file's Q4_1/Q8_0 blocks computed as stored (llama2's kernel), bfloat16."""
    return Llama.build(default_model_path, max_seq_len=1024, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def stock_llama(default_model_path):
    """The CPU path without llama2's kernel: Q4_1 repacked for PyTorch's int4 kernel, int8 head."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llama2.generation.gguf_matmul_available", lambda: False)
        return Llama.build(default_model_path, max_seq_len=1024, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def cases():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]


def test_chat_prompt_tokens_equal_llama_cpp(llama, cases):
    """Our template rendering + BPE tokenization gives llama.cpp's prompt ids exactly."""
    for case in cases:
        assert llama.chat_format.encode_dialog_prompt(case["dialog"]) == case["prompt_tokens"]


def stepwise_logits(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits predicting each continuation token: the prompt prefilled, then one cached decode step per token."""
    logits = [model(torch.tensor([prompt]), torch.arange(len(prompt)), kv_len=len(prompt), last_logits_only=True)[0]]
    for offset, token in enumerate(continuation[:-1]):
        position = len(prompt) + offset
        logits.append(model(torch.tensor([[token]]), torch.tensor([position]), kv_len=position + 1)[0])
    return torch.cat(logits)  # [len(continuation), vocab]


AGREEMENT_CASES = [
    (path, mode)
    for path in ("llama", "fast_llama", "stock_llama", "native")
    for mode in ("full-sequence", "cached-prefill", "decode-steps")
    if (path, mode) != ("llama", "decode-steps")  # the exact path decodes with its prefill's fp32 matmuls
    and (path, mode) != ("native", "full-sequence")  # the engine always runs on the cache
]


@pytest.mark.parametrize(("path", "mode"), AGREEMENT_CASES)
def test_greedy_next_token_agrees_with_llama_cpp(path, mode, request, cases):
    """Teacher-forced on llama.cpp's greedy continuation, our argmax matches at >= 95% of positions.

    Every attention and matmul path: the cache-free forward (training, scoring), the
    cached prefill that generation runs (on the CPU fast path: bfloat16 matmul attention,
    weights decoded per chunk) and decode steps (the quantized kernels); "native" is the
    C++ engine that generation runs on the fast path (`llama2.native`).
    """
    llama = request.getfixturevalue("fast_llama" if path == "native" else path)
    forward = llama.decode_step if path == "native" else llama.model
    if path == "native" and not isinstance(forward, NativeForward):
        pytest.skip("llama2's kernels do not build here")
    agree = total = 0
    with torch.inference_mode():
        for case in cases:
            prompt, continuation = case["prompt_tokens"], case["continuation"]
            tokens = torch.tensor([prompt + continuation])
            length = tokens.shape[1]
            if mode == "decode-steps":
                logits = stepwise_logits(forward, prompt, continuation)
            elif mode == "cached-prefill":
                logits = forward(tokens, torch.arange(length), kv_len=length)[0, len(prompt) - 1 : -1]
            else:
                llama.model.clear_caches()
                logits = llama.model(tokens)[0, len(prompt) - 1 : -1]
                llama.model.setup_caches(llama.max_batch_size, llama.max_seq_len)
            ours = logits.argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(ours, continuation))
            total += len(continuation)
    assert total > 500
    assert agree / total >= 0.95, f"agreement {agree}/{total} = {agree / total:.3f}"


def test_fast_path_keeps_blocks_packed(fast_llama):
    from llama2.kernels import gguf_matmul_available
    from llama2.quant import GGUFLinear, Int4Linear, Int8Linear

    layer, model = fast_llama.model.layers[0], fast_llama.model
    assert layer.attention.wqkv.out_features == 576 + 2 * 192 and layer.feed_forward.w13.out_features == 2 * 1536
    if gguf_matmul_available():  # the file's Q4_1 blocks and Q8_0 table, as stored
        assert isinstance(layer.attention.wqkv, GGUFLinear) and layer.attention.wqkv.type_name == "Q4_1"
        assert layer.attention.wqkv.blocks.numel() == (576 + 2 * 192) * 576 // 32 * 20
        assert isinstance(model.output, GGUFLinear) and model.output.type_name == "Q8_0"
    else:
        assert isinstance(layer.attention.wqkv, Int4Linear) and isinstance(layer.feed_forward.w2, Int4Linear)
        assert isinstance(model.output, Int8Linear)
    assert model.norm.weight.dtype == torch.bfloat16


def test_greedy_chat_answer_is_coherent_english(llama):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    answer = llama.chat_completion([dialog], temperature=0, max_gen_len=48)[0]["generation"]["content"]
    assert "Paris" in answer
    words = answer.split()
    assert len(words) >= 3 and all(w.isascii() for w in words)


def test_fast_path_answer_is_coherent(fast_llama):
    dialog = [{"role": "user", "content": "Give me a Python function that reverses a string."}]
    answer = fast_llama.chat_completion([dialog], temperature=0, max_gen_len=64)[0]["generation"]["content"]
    assert "def " in answer and "[::-1]" in answer and "Python" in answer


def test_batched_chat_equals_single_chats(llama, cases):
    dialogs = [case["dialog"] for case in cases[:3]]
    batched = llama.chat_completion(dialogs, temperature=0, max_gen_len=24)
    for dialog, result in zip(dialogs, batched):
        single = llama.chat_completion([dialog], temperature=0, max_gen_len=24)[0]
        assert result["generation"]["content"] == single["generation"]["content"]


def test_streamed_chat_equals_chat_completion(llama, cases):
    dialog = cases[1]["dialog"]
    complete = llama.chat_completion([dialog], temperature=0, max_gen_len=40)[0]["generation"]["content"]
    streamed = "".join(llama.stream_chat(dialog, temperature=0, max_gen_len=40))
    assert streamed == complete


def test_int8_perplexity_within_two_percent_of_bfloat16(default_model_path):
    """Per-channel int8 layers (computed by the int8 kernel) stay faithful on held-out text."""
    perplexities = {}
    for quant in ("none", "int8"):
        llama = Llama.build(default_model_path, max_seq_len=512, device="cpu", dtype=torch.bfloat16, quant=quant)
        tokens = llama.tokenizer.encode(HELDOUT_TEXT.read_text(encoding="utf-8"), bos=False, eos=False)
        assert len(tokens) > 400
        perplexities[quant] = llama.perplexity(tokens, window=256)
    assert 1 < perplexities["none"] < 100, perplexities  # a real model on plain English, not garbage
    assert abs(perplexities["int8"] / perplexities["none"] - 1) <= 0.02, perplexities
