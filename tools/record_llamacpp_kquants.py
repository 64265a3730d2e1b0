"""Record llama.cpp's quantizer output on random and edge-case rows as a test fixture.

Run outside CI with a Python that has `llama-cpp-python` (not a test dependency):

    /path/to/python tools/record_llamacpp_kquants.py tests/fixtures/llamacpp_kquant_blocks.npz

The rows (float32, 512 values each: two super-blocks) are quantized by ``ggml_quantize_chunk``
from the ggml library that llama-cpp-python ships, the function ``llama_model_quantize`` calls
for every tensor (no importance matrix: llama.cpp's reference quantizers). The fixture holds
the rows, a case name per row, and the blocks of each type; tests/test_kquants.py checks
that llama2's quantizer writes the same bytes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from importlib.metadata import version
from pathlib import Path

import llama_cpp
import numpy as np

ROW = 512
TYPES = {"Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210)}  # ggml id, values, bytes
TYPES |= {"Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34)}  # the mixes' fallbacks


def cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Case name -> [rows, ROW] float32: a model's weights and the rows that test the corners."""
    normal = rng.standard_normal((8, ROW))
    index = np.arange(ROW)
    sub_block_scales = np.repeat(10.0 ** rng.uniform(-6, 1, (4, ROW // 32)), 32, axis=1)
    return {
        "weights": normal * 0.02,
        "zeros": np.zeros((1, ROW)),
        "constant": np.full((1, ROW), 0.25),
        "negative_constant": np.full((1, ROW), -0.75),
        "negative_only": -np.abs(rng.standard_normal((2, ROW))) * 0.05,
        "positive_only": np.abs(rng.standard_normal((2, ROW))) * 0.05,
        "huge_outlier": np.where(index % 256 == 17, 1e3, rng.standard_normal((2, ROW)) * 0.01),
        "negative_outlier": np.where(index == 300, -50.0, rng.standard_normal((1, ROW)) * 0.02),
        "half_zero": np.where(index % 64 < 32, 0.0, rng.standard_normal((2, ROW)) * 0.02),
        "sparse": np.where(rng.uniform(size=(2, ROW)) < 0.05, rng.standard_normal((2, ROW)), 0.0),
        "tiny": rng.standard_normal((1, ROW)) * 1e-20,
        "large": rng.standard_normal((1, ROW)) * 1e4,
        "uniform": rng.uniform(-1, 1, (2, ROW)),
        "sub_block_scales": rng.standard_normal((4, ROW)) * sub_block_scales,
        "two_levels": np.where(rng.uniform(size=(2, ROW)) < 0.5, -0.01, 0.02),
    }


def ggml_library() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = sorted(lib_dir.glob("*ggml-base*"))
    if not names:
        sys.exit(f"no ggml-base library in {lib_dir}")
    lib = ctypes.CDLL(str(names[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    return lib


def quantize(lib: ctypes.CDLL, rows: np.ndarray, ggml_id: int, values: int, nbytes: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros((rows.shape[0], rows.shape[1] // values * nbytes), dtype=np.uint8)
    lib.ggml_quantize_init(ggml_id)
    written = lib.ggml_quantize_chunk(ggml_id, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    assert written == out.size, (written, out.size)
    return out


def main(out: str) -> None:
    named = cases(np.random.default_rng(11))
    rows = np.concatenate(list(named.values())).astype(np.float32)
    case = np.concatenate([[name] * len(block) for name, block in named.items()])
    lib = ggml_library()
    blocks = {name: quantize(lib, rows, *spec) for name, spec in TYPES.items()}
    partial = out + ".partial.npz"
    np.savez_compressed(partial, rows=rows, case=case, llama_cpp_python=np.array(version("llama-cpp-python")), **blocks)
    os.replace(partial, out)
    print(f"{out}: {len(rows)} rows x {ROW} values, {', '.join(TYPES)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
