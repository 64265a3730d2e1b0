"""Native CPU kernels, compiled from the C++ sources beside this file on first use.

The GGUF block matmul, the bfloat16 dequantizer and the native engine (`llama2.native`)
are written once (`core/`: block formats, the scalar-exact arithmetic) against a small
set of vector primitives with one header per instruction set (`simd/`), and built as one
library per variant:

    scalar        portable C++ (the reference)
    avx2          x86 AVX2 + FMA + F16C (integer dot products by vpmaddubsw / vpmaddwd)
    avx_vnni      avx2 with AVX-VNNI's vpdpbusd (Intel since Alder Lake, AMD Zen 5)
    avx512_vnni   x86 AVX-512 F/BW/VL + VNNI (Intel since Cascade Lake, AMD Zen 4)
    neon          aarch64 Advanced SIMD
    neon_dot      aarch64 with the dot product extension (sdot; Cortex-A76+, Apple M1+)

No i8mm variant: smmla multiplies 2 x 8 by 8 x 2 int8 tiles, which pays with two or more
activation rows per weight row; decode (one row) is where these kernels spend their time,
and prefill chunks of 32+ rows go to PyTorch's bf16 GEMM on the dequantized blocks.

Every variant computes bitwise the same results (integer block sums are exact, and all
float reductions follow one fixed order, see `simd/scalar.h`). `pick_isa` chooses the best
variant this CPU runs (`LLAMA2_CPU_ISA=<variant>` forces one, clamped to what the CPU has);
`gguf_matmul_available()` builds it with `torch.utils.cpp_extension` (once per machine and
PyTorch version, ~30 s, cached by PyTorch under ~/.cache/torch_extensions as
`llama2_kernels_<variant>`) and registers, as the torch library `llama2_kernels`:
`gguf_matmul(x, raw, qtype, n, k)` (y = x W^T, activations quantized per block of 32 to
int8; decode; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), `gguf_dequantize(raw, qtype,
n, k)` (W as bfloat16; prefill chunks; those and Q2_K, Q3_K), and
the TorchScript class `GGUFLlama`, the native engine. Without a C++ compiler, with a
failed build (it warns once) or with LLAMA2_NO_KERNELS=1, callers use PyTorch's stock
kernels.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("gguf_gemv.cpp", "gguf_dequant.cpp", "llama_engine.cpp")]
NAMESPACE = "llama2_kernels"  # the torch library of the variant in use

# Variants per architecture, best first, with the CPU features each needs (keys of
# torch.cpu.get_capabilities(), plus 'asimddp' / 'i8mm' from `arm_features`).
X86_VARIANTS = {
    "avx512_vnni": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_vnni", "avx2", "fma3", "f16c"),
    "avx_vnni": ("avx_vnni", "avx2", "fma3", "f16c"),
    "avx2": ("avx2", "fma3", "f16c"),
    "scalar": (),
}
ARM_VARIANTS = {"neon_dot": ("asimddp",), "neon": (), "scalar": ()}
VARIANTS = ("scalar", "avx2", "avx_vnni", "avx512_vnni", "neon", "neon_dot")

# Compiler flags per variant: each library is compiled uniformly for its instruction set
# (on aarch64 neon is the baseline; a neon_dot library is only ever loaded on a CPU with
# the dot product extension, so the whole library may use it).
GCC_ISA_FLAGS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"],
    "avx512_vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "neon": [],
    "neon_dot": ["-march=armv8.2-a+dotprod"],
}
MSVC_ISA_FLAGS = {
    "scalar": [],
    "avx2": ["/arch:AVX2"],
    "avx_vnni": ["/arch:AVX2"],
    "avx512_vnni": ["/arch:AVX512"],
    "neon": [],
    "neon_dot": [],
}


def arm_features() -> set[str]:
    """aarch64 features beyond the baseline that the variants use ('asimddp': sdot/udot, 'i8mm'):
    /proc/cpuinfo's Features on Linux, sysctl hw.optional.arm.FEAT_* on macOS (every Apple
    M chip has dot products)."""
    features: set[str] = set()
    if sys.platform == "darwin":
        for name, key in (("asimddp", "hw.optional.arm.FEAT_DotProd"), ("i8mm", "hw.optional.arm.FEAT_I8MM")):
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if out.strip() == "1":
                features.add(name)
        return features
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return features
    for line in text.splitlines():
        if line.lower().startswith("features"):
            features.update(line.split(":", 1)[1].split())
    return features & {"asimddp", "i8mm"}


def cpu_capabilities() -> dict:
    """torch.cpu.get_capabilities() (absent in old PyTorch: {}), 'architecture' always set,
    with the aarch64 features of `arm_features` added as True keys."""
    try:
        caps = dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):
        caps = {}
    caps.setdefault("architecture", platform.machine())
    if _is_arm(caps):
        caps.update({name: True for name in arm_features()})
    return caps


def _is_arm(caps: dict) -> bool:
    return str(caps.get("architecture", "")).lower() in ("aarch64", "arm64", "armv8", "arm64e")


def _is_x86(caps: dict) -> bool:
    return str(caps.get("architecture", "")).lower() in ("x86_64", "amd64", "x64", "x86")


def supported_isas(capabilities: dict) -> list[str]:
    """The variants a CPU with these capabilities runs, best first (missing keys count as absent)."""
    table = X86_VARIANTS if _is_x86(capabilities) else ARM_VARIANTS if _is_arm(capabilities) else {"scalar": ()}
    return [isa for isa, needs in table.items() if all(capabilities.get(key) is True for key in needs)]


def pick_isa(capabilities: dict, requested: str | None = None) -> str:
    """The variant to use on a CPU with `capabilities` (torch.cpu.get_capabilities()'s keys).

    Without `requested`: the best the CPU runs. With one (LLAMA2_CPU_ISA): that variant if
    the CPU runs it, else (with a warning) the best the CPU runs among those ranked below it
    on its architecture (any other name: the best the CPU runs). Never a variant the CPU
    lacks, so never an illegal instruction.
    """
    supported = supported_isas(capabilities)
    if not requested or requested == supported[0]:
        return supported[0]
    if requested not in VARIANTS:
        warnings.warn(
            f"LLAMA2_CPU_ISA={requested!r} is not one of {', '.join(VARIANTS)}; using {supported[0]}", stacklevel=2
        )
        return supported[0]
    if requested in supported:
        return requested
    table = list(X86_VARIANTS if _is_x86(capabilities) else ARM_VARIANTS if _is_arm(capabilities) else ["scalar"])
    below = table[table.index(requested) + 1 :] if requested in table else []
    chosen = next((isa for isa in below if isa in supported), supported[0])
    warnings.warn(f"LLAMA2_CPU_ISA={requested}: this CPU does not run it; using {chosen}", stacklevel=2)
    return chosen


@functools.cache
def requested_isa() -> str:
    """The variant this process uses (pick_isa on this CPU and LLAMA2_CPU_ISA), built or not."""
    return pick_isa(cpu_capabilities(), os.environ.get("LLAMA2_CPU_ISA", "").strip() or None)


def selected_isa() -> str:
    """The kernel variant in use ('avx2', ...), or 'none' where the kernels are off or did not build."""
    return requested_isa() if gguf_matmul_available() else "none"


@functools.cache
def gguf_matmul_available() -> bool:
    """Build and load the kernels (as torch library llama2_kernels); False (with a warning) if they cannot."""
    if os.environ.get("LLAMA2_NO_KERNELS", "") not in ("", "0"):
        return False
    isa = requested_isa()
    try:
        build_kernels(isa)
    except Exception as err:  # no compiler, no ninja, a failed build: the stock kernels still work
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        warnings.warn(f"llama2's {isa} kernels could not be built ({reason}); using PyTorch's kernels", stacklevel=2)
        return False
    _register_fake()
    return True


def namespace_for(isa: str) -> str:
    """The torch library a variant's build registers: llama2_kernels for the one in use, else its own."""
    return NAMESPACE if isa == requested_isa() else f"{NAMESPACE}_{isa}"


@functools.cache
def variant_ops(isa: str):
    """torch.ops.<namespace> of a variant this CPU runs, built if needed (tests compare variants in one process)."""
    if isa == requested_isa():
        if not gguf_matmul_available():
            raise RuntimeError("llama2's kernels are off or did not build")
    else:
        if isa not in supported_isas(cpu_capabilities()):
            raise ValueError(f"this CPU does not run the {isa} kernels")
        build_kernels(isa, namespace_for(isa))
    return getattr(torch.ops, namespace_for(isa))


def compile_flags(isa: str, compiler: str, openmp: bool = True) -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of a variant for 'gcc' (also clang on Linux), 'apple-clang' or 'msvc'.

    -ffp-contract=off (MSVC: /fp:precise) keeps the compiler from fusing a multiply and an
    add on its own: the kernels write their fused multiply-adds explicitly, the same in
    every variant. OpenMP: at::parallel_for's inline code runs threads only where the file
    is compiled with it (PyTorch's own backend); Apple clang takes it through the
    preprocessor, with PyTorch's bundled libomp. Without `openmp` the kernels run serially.
    """
    define = f"LLAMA2_ISA_{isa.upper()}"
    if compiler == "msvc":
        return [
            "/O2",
            "/std:c++17",
            "/fp:precise",
            *(["/openmp"] if openmp else []),
            *MSVC_ISA_FLAGS[isa],
            f"/D{define}",
        ], []
    common = ["-O3", "-std=c++17", "-ffp-contract=off", *GCC_ISA_FLAGS[isa], f"-D{define}"]
    if not openmp:
        return common, []
    if compiler == "apple-clang":
        torch_lib = Path(torch.__file__).parent / "lib"
        return [*common, "-Xpreprocessor", "-fopenmp"], [f"-L{torch_lib}", "-lomp"]
    return [*common, "-fopenmp"], ["-fopenmp"]


def _openmp_usable(compiler: str) -> bool:
    """Whether PyTorch runs on OpenMP and, for Apple clang (no OpenMP of its own), ships omp.h and libomp."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    if compiler != "apple-clang":
        return True
    root = Path(torch.__file__).parent
    return (root / "include" / "omp.h").exists() and any((root / "lib").glob("libomp*"))


def _compiler() -> str:
    if sys.platform == "win32":
        return "msvc"
    return "apple-clang" if sys.platform == "darwin" else "gcc"


def build_kernels(isa: str, namespace: str = NAMESPACE) -> None:
    """Compile (or find compiled) and load variant `isa` as the torch library `namespace`.

    The build is cached under its own name: llama2_kernels_<isa> (and _<namespace> for a
    test build in another namespace, so that several variants load into one process).
    """
    from torch.utils import cpp_extension

    if isa not in VARIANTS:
        raise ValueError(f"unknown kernel variant {isa!r} (one of {', '.join(VARIANTS)})")
    _put_ninja_on_path()
    cflags, ldflags = compile_flags(isa, _compiler(), _openmp_usable(_compiler()))
    name = f"{NAMESPACE}_{isa}" if namespace == NAMESPACE else f"{NAMESPACE}_{isa}_{namespace}"
    cpp_extension.load(
        name=name,
        sources=[str(path) for path in SOURCES],
        extra_cflags=[*cflags, f"-DGGUF_NS={namespace}" if _compiler() != "msvc" else f"/DGGUF_NS={namespace}"],
        extra_ldflags=ldflags,
        extra_include_paths=[str(HERE)],
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
    """Shapes of the ops' outputs for torch.compile's tracing."""

    def fake_gguf_matmul(x, raw, qtype, n, k):
        torch._check(x.shape[-1] == k)
        return x.new_empty((*x.shape[:-1], n))

    def fake_gguf_dequantize(raw, qtype, n, k):
        return raw.new_empty((n, k), dtype=torch.bfloat16)

    torch.library.register_fake(f"{NAMESPACE}::gguf_matmul", fake_gguf_matmul)
    torch.library.register_fake(f"{NAMESPACE}::gguf_dequantize", fake_gguf_dequantize)
