"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) against llama.cpp's recorded outputs."""

import json
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.generation import Llama
from llama2.loader import default_device
from llama2.weights import registry

FIXTURE = Path(__file__).parent / "fixtures" / "llamacpp_greedy_smollm2.json"
HELDOUT_TEXT = Path(__file__).parent / "fixtures" / "heldout.txt"  # written for this test, never trained on

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def llama(default_model_path):
    """The exact path: every weight dequantized to float32."""
    return Llama.build(default_model_path, max_seq_len=1024, max_batch_size=4, device="cpu", quant="none")


@pytest.fixture(scope="module")
def fast_llama(default_model_path):
    """The default CPU path: the file's Q4_1/Q8_0 blocks (llama2's kernels and engine where they build), bfloat16."""
    return Llama.build(default_model_path, max_seq_len=1024, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def default_llama(default_model_path):
    """What `llama2 chat` runs on this machine: the default model with every default option."""
    return Llama.build(registry.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def stock_llama(default_model_path):
    """The CPU path without llama2's kernels (as with LLAMA2_NO_KERNELS=1 or where they do not build):
    Q4_1 repacked for PyTorch's int4 kernel, Q8_0 and the head as per-channel int8."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llama2.loader.gguf_matmul_available", lambda: False)
        return Llama.build(default_model_path, max_seq_len=1024, max_batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def cases():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]


def test_chat_prompt_tokens_equal_llama_cpp(llama, cases):
    """Our template rendering + BPE tokenization gives llama.cpp's prompt ids exactly."""
    for case in cases:
        assert llama.chat_format.encode_dialog_prompt(case["dialog"]) == case["prompt_tokens"]


def stepwise_logits(model, prompt: list[int], continuation: list[int], device: torch.device) -> torch.Tensor:
    """Logits predicting each continuation token: the prompt prefilled, then one cached decode step per token."""
    positions = torch.arange(len(prompt), device=device)
    logits = [model(torch.tensor([prompt], device=device), positions, kv_len=len(prompt), last_logits_only=True)[0]]
    for offset, token in enumerate(continuation[:-1]):
        position = len(prompt) + offset
        step = model(
            torch.tensor([[token]], device=device), torch.tensor([position], device=device), kv_len=position + 1
        )
        logits.append(step[0])
    return torch.cat(logits)  # [len(continuation), vocab]


# Path -> (its Llama fixture, the forward measured): the modules' cached forward, or the step
# generation calls (the native engine where llama2's kernels build, else the modules).
AGREEMENT_PATHS = {
    "llama": ("llama", "model"),
    "cpu_modules": ("fast_llama", "model"),
    "stock": ("stock_llama", "steps.decode_step"),
    "default": ("default_llama", "steps.decode_step"),
}
if default_device().type != "cpu":  # else "default" is this path
    AGREEMENT_PATHS["cpu_step"] = ("fast_llama", "steps.decode_step")
AGREEMENT_CASES = [
    (path, mode)
    for path, (_, forward) in AGREEMENT_PATHS.items()
    for mode in ("full-sequence", "cached-prefill", "decode-steps")
    if (path, mode) != ("llama", "decode-steps")  # the exact path decodes with its prefill's fp32 matmuls
    and not (mode == "full-sequence" and path in ("default", "cpu_step"))  # the modules' forward, measured above
]


@pytest.mark.parametrize(("path", "mode"), AGREEMENT_CASES)
def test_greedy_next_token_agrees_with_llama_cpp(path, mode, request, cases):
    """Teacher-forced on llama.cpp's greedy continuation, our argmax matches at >= 95% of positions.

    Every attention and matmul path: the cache-free forward (training, scoring), the
    cached prefill that generation runs (on the CPU fast path: bfloat16 matmul attention,
    weights decoded per chunk) and decode steps (the quantized kernels). "default" is
    exactly what `llama2 chat` runs here (`Llama.build` with default options: the native
    engine where llama2's kernels build, PyTorch's kernels elsewhere, CUDA when present);
    "stock" is the CPU path without llama2's kernels, as on a CPU they do not build for.
    """
    fixture, forward_name = AGREEMENT_PATHS[path]
    llama = request.getfixturevalue(fixture)
    forward = operator.attrgetter(forward_name)(llama)
    agree = total = 0
    with torch.inference_mode():
        for case in cases:
            prompt, continuation = case["prompt_tokens"], case["continuation"]
            tokens = torch.tensor([prompt + continuation], device=llama.device)
            length = tokens.shape[1]
            if mode == "decode-steps":
                logits = stepwise_logits(forward, prompt, continuation, llama.device)
            elif mode == "cached-prefill":
                logits = forward(tokens, torch.arange(length, device=llama.device), kv_len=length)[
                    0, len(prompt) - 1 : -1
                ]
            else:
                llama.model.clear_caches()
                logits = llama.model(tokens)[0, len(prompt) - 1 : -1]
                llama.model.setup_caches(llama.max_batch_size, llama.max_seq_len)
            ours = logits.argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(ours, continuation, strict=True))
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


def test_stock_path_repacks_fused_blocks_for_pytorchs_kernels(stock_llama):
    from llama2.quant import Int4Linear, Int8Linear

    layer, model = stock_llama.model.layers[0], stock_llama.model
    assert isinstance(layer.attention.wqkv, Int4Linear) and layer.attention.wqkv.out_features == 576 + 2 * 192
    assert isinstance(layer.feed_forward.w13, Int4Linear) and layer.feed_forward.w13.out_features == 2 * 1536
    assert isinstance(model.output, Int8Linear) and stock_llama.steps.native is None


def test_greedy_chat_answer_is_coherent_english(llama):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    answer = llama.chat_completion([dialog], temperature=0, max_gen_len=48)[0]["generation"]["content"]
    assert "Paris" in answer
    words = answer.split()
    assert len(words) >= 3 and all(w.isascii() for w in words)


@pytest.mark.parametrize("path", ["default_llama", "stock_llama"])
def test_quantized_path_answer_is_coherent(path, request):
    dialog = [{"role": "user", "content": "Give me a Python function that reverses a string."}]
    answer = request.getfixturevalue(path).chat_completion([dialog], temperature=0, max_gen_len=64)[0]["generation"][
        "content"
    ]
    assert "def " in answer and "[::-1]" in answer and "Python" in answer


def test_batched_chat_equals_single_chats(llama, cases):
    dialogs = [case["dialog"] for case in cases[:3]]
    batched = llama.chat_completion(dialogs, temperature=0, max_gen_len=24)
    for dialog, result in zip(dialogs, batched, strict=True):
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


def test_bench_json_is_one_object_naming_the_backend_that_ran(default_llama):
    """`llama2 bench --json` on the default model: one JSON object whose backend is what `Llama` runs here."""
    command = [
        sys.executable,
        "-m",
        "llama2.cli",
        "bench",
        "--json",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--repeats",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # fails on anything besides one JSON value
    assert isinstance(report, dict)
    assert report["prompt_tps"] > 0 and report["decode_tps"] > 0
    assert all(isinstance(report[key], float) for key in ("prompt_tps", "decode_tps"))
    if default_llama.steps.native is not None:
        assert report["backend"].startswith("native/") and len(report["backend"]) > len("native/")
    else:
        from llama2.quant import GGUFLinear, Int4Linear, Int8Linear

        kind = {GGUFLinear: "gguf", Int4Linear: "int4", Int8Linear: "int8"}.get(
            type(default_llama.model.layers[0].attention.wqkv)
        )
        assert report["backend"].startswith("modules/") and (kind is None or kind in report["backend"])
    if report["peak_rss_mb"] is not None:  # None only where the platform does not say (Windows without psutil)
        assert isinstance(report["peak_rss_mb"], float) and isinstance(report["rss_above_torch_mb"], float)
        assert 0 < report["rss_above_torch_mb"] < report["peak_rss_mb"]
