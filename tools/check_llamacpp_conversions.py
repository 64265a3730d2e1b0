"""Check our converters against llama.cpp and transformers on the default model (outside CI).

    python tools/check_llamacpp_conversions.py --lcpp-python /tmp/lcpp/bin/python --out /tmp/llama2-check

1. Converts the default model (SmolLM2-135M-Instruct, GGUF Q4_1, read and dequantized by
   our reader) with `llama2.weights.convert` to GGUF F16, Q8_0 and Q4_0 and to a Hugging
   Face folder.
2. Loads the Hugging Face folder in `transformers` (AutoModelForCausalLM + AutoTokenizer),
   compares its logits with our model on the original GGUF, and greedy-chats with it.
3. Runs itself under an interpreter that has `llama-cpp-python` (not a dependency of
   this project) to load the original and each converted GGUF in llama.cpp and
   greedy-chat with each.
4. Prints every answer and how many leading tokens agree with transformers' answer (an
   f32 reference) and with llama.cpp's answer on the original Q4_1 file (whose 4-bit
   weights times 8-bit-quantized activations already drift from f32 math).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for sleeping well."]
MAX_TOKENS = 48
GGUF_TYPES = ("f16", "q8_0", "q4_0")


def llamacpp_answers(paths: list[str], references: list[str]) -> dict:
    """(Run under llama-cpp-python.) Greedy chat answers of each GGUF, as token ids and text; `references` tokenized."""
    from importlib.metadata import version

    import llama_cpp

    results = {"llama_cpp_python": version("llama-cpp-python"), "files": {}}
    for path in paths:
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=0)
        results.setdefault("references", [llm.tokenize(t.encode(), add_bos=False, special=False) for t in references])
        answers = []
        for prompt in PROMPTS:
            out = llm.create_chat_completion(
                [{"role": "user", "content": prompt}],
                temperature=0.0,
                top_k=1,
                max_tokens=MAX_TOKENS,
                repeat_penalty=1.0,
            )
            text = out["choices"][0]["message"]["content"]
            answers.append({"text": text, "tokens": llm.tokenize(text.encode(), add_bos=False, special=False)})
        results["files"][path] = answers
    return results


def convert_all(source: Path, out: Path) -> dict[str, Path]:
    from llama2.weights.convert import convert

    out.mkdir(parents=True, exist_ok=True)
    outputs = {
        kind: convert(source, out / f"smollm2.{kind}.gguf", "gguf", tensor_type=kind, overwrite=True)
        for kind in GGUF_TYPES
    }
    outputs["hf"] = convert(source, out / "hf", "hf", overwrite=True)
    return outputs


def transformers_check(source: Path, hf_folder: Path) -> dict:
    """Logits of transformers on our HF output vs our model on the source, and transformers' greedy answers."""
    import torch
    import transformers

    from llama2.model import Transformer
    from llama2.weights import load_checkpoint

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder)
    checkpoint = load_checkpoint(source)
    with torch.device("meta"):
        ours = Transformer(checkpoint.args)
    ours.load_state_dict(checkpoint.state_dict, strict=True, assign=True)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0]
        mine = ours.eval()(torch.tensor([ids]))[0].float()
    answers = []
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generated = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return {"max_abs_logit_diff": float((reference - mine).abs().max()), "answers": answers}


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcpp-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    parser.add_argument("--out", type=Path, default=Path("llama2-check"))
    parser.add_argument("--llamacpp", nargs="+", help=argparse.SUPPRESS)  # internal: run under llama-cpp-python
    parser.add_argument("--references", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llamacpp:
        print(json.dumps(llamacpp_answers(args.llamacpp, json.loads(args.references))))
        return

    from llama2.weights import registry

    source = registry.resolve(registry.DEFAULT_MODEL)
    outputs = convert_all(source, args.out)
    hf = transformers_check(source, outputs["hf"])
    print(
        f"transformers on our HF output vs our model on {source.name}: max |logit diff| {hf['max_abs_logit_diff']:.2e}"
    )
    for prompt, answer in zip(PROMPTS, hf["answers"]):
        print(f"  transformers (HF output) | {prompt} -> {answer!r}")

    files = [str(source)] + [str(outputs[kind]) for kind in GGUF_TYPES]
    command = [args.lcpp_python, __file__, "--llamacpp", *files, "--references", json.dumps(hf["answers"])]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    results = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"llama.cpp via llama-cpp-python {results['llama_cpp_python']}:")
    original = results["files"][str(source)]
    for path in files:
        for prompt, answer, base, reference in zip(PROMPTS, results["files"][path], original, results["references"]):
            print(
                f"  {Path(path).name:34s} | {prompt} -> {answer['text']!r} "
                f"[{agreement(answer['tokens'], reference)}/{len(reference)} tokens as transformers, "
                f"{agreement(answer['tokens'], base['tokens'])}/{len(base['tokens'])} as llama.cpp on the original]"
            )


if __name__ == "__main__":
    main()
