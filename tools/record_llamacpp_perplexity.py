"""Record llama.cpp's perplexity (llama-perplexity's method) on the default model as a test fixture.

Run outside CI, in an environment with `llama-cpp-python` installed (it is not a test
dependency):
`python tools/record_llamacpp_perplexity.py TEXT_PATH N_CTX OUT.json LABEL=GGUF_PATH...`, for the fixture:
`python tools/record_llamacpp_perplexity.py tests/fixtures/lighthouse.txt 512
tests/fixtures/llamacpp_perplexity_smollm2.json q4_1=SmolLM2-135M-Instruct.Q4_1.gguf f32=F32.gguf`
where F32.gguf is `llama2 convert smollm2-135m-instruct F32.gguf --to gguf --type f32`: the
same weights dequantized, so the f32 run shows llama.cpp's method without llama.cpp's own
8-bit quantization of activations in its Q4_1 dot products.
It follows tools/perplexity/perplexity.cpp (`perplexity`): the whole text tokenized once by
llama.cpp with its special tokens added (BOS when the vocabulary adds it), cut into
len(tokens) // n_ctx chunks, each chunk's first token set to BOS when the vocabulary adds
it, every chunk evaluated by llama.cpp on a cleared cache with the logits of all
positions, and the tokens first + 1 .. n_ctx - 1 (first = n_ctx // 2) scored from the
logits one position before them. The fixture keeps llama.cpp's token ids, per-chunk NLL
sums and counts, the final PPL and its +/- as llama.cpp prints them.
"""

import json
import math
import sys
from importlib.metadata import version
from pathlib import Path

import llama_cpp
import numpy as np


def load_without_repack(gguf_path: str, n_ctx: int) -> llama_cpp.Llama:
    """The model with llama.cpp's `--no-repack` (use_extra_bufts off), logits of every position kept.

    llama-cpp-python 0.3.36's CPU build segfaults in llama_decode on batches of 4+ tokens of
    a quantized model with the repacked (AVX-512/AMX) weight layout on Sapphire Rapids;
    the plain layout computes the same products.
    """
    default_params = llama_cpp.llama_model_default_params

    def params_without_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = params_without_repack
    try:
        return llama_cpp.Llama(
            model_path=gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True, verbose=False
        )
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default_params


def chunk_nll(llm: llama_cpp.Llama, chunk: list[int]) -> np.ndarray:
    """NLL of chunk tokens first+1 .. n_ctx-1 given the logits of the positions before them."""
    llm.reset()
    llm.eval(chunk)
    n_ctx = len(chunk)
    first = n_ctx // 2
    logits = np.asarray(llm.scores[first : n_ctx - 1], dtype=np.float64)
    log_norm = logits.max(axis=1) + np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1))
    targets = np.asarray(chunk[first + 1 :])
    return log_norm - logits[np.arange(len(targets)), targets]


def run(gguf_path: str, text: str, n_ctx: int) -> dict:
    """llama-perplexity's evaluation of `text` on one GGUF: tokens, per-chunk sums, PPL +/- error."""
    llm = load_without_repack(gguf_path, n_ctx)
    add_bos = llm._model.add_bos_token()
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # common_tokenize(ctx, text, true)
    assert len(tokens) >= 2 * n_ctx, f"{len(tokens)} tokens: llama-perplexity needs 2 x n_ctx"
    chunks, all_nll = [], []
    for start in range(0, len(tokens) // n_ctx * n_ctx, n_ctx):
        chunk = list(tokens[start : start + n_ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        nll = chunk_nll(llm, chunk)
        all_nll.append(nll)
        chunks.append({"nll_sum": float(nll.sum()), "tokens_scored": len(nll)})
    nll = np.concatenate(all_nll)
    mean = nll.mean()
    error = math.sqrt((np.mean(nll**2) - mean**2) / (len(nll) - 1)) * math.exp(mean)
    print(f"{Path(gguf_path).name}: PPL = {math.exp(mean):.4f} +/- {error:.5f} over {len(nll)} tokens")
    return {
        "gguf": Path(gguf_path).name,
        "add_bos": add_bos,
        "tokens": tokens,
        "chunks": chunks,
        "tokens_scored": int(len(nll)),
        "ppl": math.exp(mean),
        "ppl_error": error,
    }


def main(text_path: str, n_ctx: int, out_path: str, runs: list[tuple[str, str]]) -> None:
    """Record one run per (label, GGUF) pair."""
    text = Path(text_path).read_text(encoding="utf-8")
    fixture = {
        "text": Path(text_path).name,
        "recorded_with": f"llama-cpp-python {version('llama-cpp-python')}, n_threads=2, n_batch=n_ctx, logits_all, "
        "use_extra_bufts=False (--no-repack)",
        "n_ctx": n_ctx,
        "runs": {label: run(path, text, n_ctx) for label, path in runs},
    }
    Path(out_path).write_text(json.dumps(fixture, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], [tuple(arg.split("=", 1)) for arg in sys.argv[4:]])
