"""Make a K-quant GGUF (Q4_K_M, Q5_K_M) of the default model with llama.cpp's own quantizer, and
record llama.cpp's greedy chat tokens on it as a test fixture.

Run outside CI (llama-cpp-python is not a test dependency) from llama2's environment,
naming a Python that has `llama_cpp`:

    python tools/make_kquant_model.py OUT.gguf --llama-cpp-python /path/to/python [--ftype Q4_K_M]
        [--fixture tests/fixtures/llamacpp_greedy_smollm2_q4_k_m.json]
        [--tensor-hashes tests/fixtures/llamacpp_smollm2_q4_k_m_tensors.json]

1. The default model (SmolLM2-135M-Instruct Q4_1) is written as an F32 GGUF by llama2's own
   converter (`llama2.weights.convert`; the Q4_1 values exactly, with the tokenizer).
2. llama.cpp's `llama_model_quantize` (ftype LLAMA_FTYPE_MOSTLY_Q4_K_M = 15, Q5_K_M = 17)
   quantizes it. SmolLM2-135M's width, 576, is not a multiple of 256, so llama.cpp stores
   the rows of that length in its fallbacks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0):
   the Q4_K_M file mixes Q5_0, Q8_0, Q4_K (and Q6_K) tensors.
3. With --fixture, tools/record_llamacpp_greedy.py runs on the result with the same Python,
   and the fixture is stamped with the file's name and SHA-256 (the quantizer is
   deterministic: the same llama.cpp makes the same bytes).

4. With --tensor-hashes, each tensor's type and the SHA-256 of its data are recorded.

tests/test_kquant_kernels.py writes llama2's own Q4_K_M of the default model (`llama2 quantize
--type q4_k_m`), checks its tensors against the recorded hashes, and measures llama2's
agreement with the greedy fixture on it (or on the file at LLAMA2_KQUANT_GGUF).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llama2.weights import registry
from llama2.weights.convert import convert

FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
RECORDER = Path(__file__).with_name("record_llamacpp_greedy.py")

QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def quantize(llama_cpp_python: str, source: Path, out: Path, ftype: str) -> None:
    """llama.cpp's quantizer, run by `llama_cpp_python`, from `source` to `out` (written whole, then renamed)."""
    partial = out.with_name(out.name + ".partial")
    subprocess.run([llama_cpp_python, "-c", QUANTIZE, str(source), str(partial), str(FTYPES[ftype])], check=True)
    os.replace(partial, out)


def record(llama_cpp_python: str, model: Path, fixture: Path, ftype: str) -> None:
    """llama.cpp's greedy tokens on `model` into `fixture`, stamped with the file it was recorded on."""
    partial = fixture.with_name(fixture.name + ".partial")
    subprocess.run([llama_cpp_python, str(RECORDER), str(model), str(partial)], check=True)
    data = json.loads(partial.read_text(encoding="utf-8"))
    data["model"] = (
        f"{registry.DEFAULT_MODEL} {ftype}: its Q4_1 GGUF written as F32 by llama2 convert, quantized by "
        "llama.cpp's llama_model_quantize (tools/make_kquant_model.py)"
    )
    data["sha256"] = sha256(model)
    partial.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, fixture)


def record_tensor_hashes(model: Path, out: Path) -> None:
    """GGUF tensor name -> {"type", "sha256" of its data} of `model`, into `out` (JSON)."""
    from gguf import GGUFReader

    reader = GGUFReader(model)
    tensors = {
        t.name: {"type": t.tensor_type.name, "sha256": hashlib.sha256(memoryview(t.data).cast("B")).hexdigest()}
        for t in reader.tensors
    }
    partial = out.with_name(out.name + ".partial")
    data = {"model": model.name, "file_sha256": sha256(model), "tensors": tensors}
    partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the K-quant GGUF to write")
    parser.add_argument("--llama-cpp-python", required=True, help="a Python interpreter with llama_cpp installed")
    parser.add_argument("--ftype", choices=sorted(FTYPES), default="Q4_K_M")
    parser.add_argument("--fixture", type=Path, help="also record llama.cpp's greedy tokens on the result here")
    parser.add_argument("--tensor-hashes", type=Path, help="also record each tensor's type and data SHA-256 here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        convert(registry.DEFAULT_MODEL, f32, "gguf", tensor_type="f32")
        quantize(args.llama_cpp_python, f32, args.out, args.ftype)
    print(f"{args.out}: {args.ftype}, sha256 {sha256(args.out)}")
    if args.fixture:
        record(args.llama_cpp_python, args.out, args.fixture, args.ftype)
    if args.tensor_hashes:
        record_tensor_hashes(args.out, args.tensor_hashes)


if __name__ == "__main__":
    sys.exit(main())
