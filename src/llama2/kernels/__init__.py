"""Native CPU kernels, compiled from the C++ sources beside this file on first use.

`gguf_matmul_available()` builds the sources with `torch.utils.cpp_extension` (once per
machine and PyTorch version, ~30 s, cached by PyTorch under ~/.cache/torch_extensions)
and registers two ops on GGUF Q4_0 / Q4_1 / Q8_0 blocks as stored:
`torch.ops.llama2_kernels.gguf_matmul(x, raw, qtype, n, k)`: y = x W^T with the
activations quantized per block of 32 to int8 and dot products in AVX-512 VNNI
(decode); `gguf_dequantize(raw, qtype, n, k)`: W as bfloat16 (prefill chunks); and the
TorchScript class `torch.classes.llama2_kernels.GGUFLlama`, the native engine that
`llama2.native` drives. Where that cannot be built or would not run (no AVX-512 VNNI, no C++ compiler,
LLAMA2_NO_KERNELS=1) callers use PyTorch's stock kernels (a failed build warns once).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("gguf_gemv.cpp", "gguf_dequant.cpp", "llama_engine.cpp")]
GCC_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]
MSVC_FLAGS = ["/O2", "/std:c++17", "/openmp", "/arch:AVX512"]


def cpu_has_avx512_vnni() -> bool:
    """Whether this CPU runs the kernel's AVX-512 VNNI code (PyTorch's own CPU probe)."""
    try:
        return torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported()
    except (AttributeError, RuntimeError):  # a PyTorch without the probes
        return False


@functools.cache
def gguf_matmul_available() -> bool:
    """Build and load the GGUF matmul kernel if this machine can run it; False (with a warning) if not."""
    if os.environ.get("LLAMA2_NO_KERNELS", "") not in ("", "0"):
        return False
    if not cpu_has_avx512_vnni():
        return False  # PyTorch's int4/int8 kernels are the better choice there
    try:
        build_kernels("llama2_gguf_kernels")
    except Exception as err:  # no compiler, no ninja, a failed build: the stock kernels still work
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        warnings.warn(f"llama2's GGUF kernels could not be built ({reason}); using PyTorch's kernels", stacklevel=2)
        return False
    _register_fake()
    return True


def build_kernels(name: str, vector_code: bool = True, namespace: str | None = None) -> None:
    """Compile (or find compiled) and load the kernels as the torch library `namespace`.

    Args:
        name: the build's name (its folder under PyTorch's extension cache).
        vector_code: compile the AVX-512 VNNI code; without it, the portable scalar code.
        namespace: torch library namespace (default llama2_kernels); a second build loaded
            into one process needs its own.
    """
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    windows = sys.platform == "win32"
    flags = (MSVC_FLAGS if windows else GCC_FLAGS) if vector_code else (MSVC_FLAGS[:3] if windows else GCC_FLAGS[:3])
    if namespace is not None:
        flags = [*flags, f"-DGGUF_NS={namespace}"]
    cpp_extension.load(
        name=name,
        sources=[str(path) for path in SOURCES],
        extra_cflags=flags,
        extra_ldflags=[] if windows else ["-fopenmp"],
        is_python_module=False,
    )


def _put_ninja_on_path() -> None:
    """PyTorch's builder runs `ninja` from PATH; the `ninja` package's copy is in the venv, maybe not on it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _register_fake() -> None:
    """Shapes of the op's output for torch.compile's tracing."""

    def fake_gguf_matmul(x, raw, qtype, n, k):
        torch._check(x.shape[-1] == k)
        return x.new_empty((*x.shape[:-1], n))

    def fake_gguf_dequantize(raw, qtype, n, k):
        return raw.new_empty((n, k), dtype=torch.bfloat16)

    torch.library.register_fake("llama2_kernels::gguf_matmul", fake_gguf_matmul)
    torch.library.register_fake("llama2_kernels::gguf_dequantize", fake_gguf_dequantize)
