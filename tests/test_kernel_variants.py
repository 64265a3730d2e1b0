"""The kernel variants (scalar, avx2, avx_vnni, avx512_vnni, neon, neon_dot): the picker,
the build flags, bitwise equality with the scalar reference in a torch-free driver (natively
with g++ and clang++, for aarch64 under qemu; every block type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
the K-quants), and the engine's logits on the default model."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llama2 import kernels
from llama2.kernels import compile_flags, cpu_capabilities, pick_isa, supported_isas

ROOT = Path(__file__).parent.parent
KERNELS = ROOT / "src" / "llama2" / "kernels"
DRIVER = Path(__file__).parent / "kernel_selftest"

SAPPHIRE_RAPIDS = {
    "architecture": "x86_64",
    "avx2": True,
    "fma3": True,
    "f16c": True,
    "avx_vnni": True,
    "avx512_f": True,
    "avx512_bw": True,
    "avx512_vl": True,
    "avx512_vnni": True,
}
ALDER_LAKE = {
    "architecture": "x86_64",
    "avx2": True,
    "fma3": True,
    "f16c": True,
    "avx_vnni": True,
    "avx512_f": False,
    "avx512_vnni": False,
}
ZEN3 = {"architecture": "x86_64", "avx2": True, "fma3": True, "f16c": True, "avx_vnni": False}
OLD_X86 = {"architecture": "x86_64", "avx": True, "sse4_2": True}


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (SAPPHIRE_RAPIDS, "avx512_vnni"),
        (ALDER_LAKE, "avx_vnni"),
        (ZEN3, "avx2"),
        (OLD_X86, "scalar"),
        (
            {**SAPPHIRE_RAPIDS, "avx512_vnni": False},
            "avx_vnni",
        ),  # Ice Lake client-like: AVX-512 without VNNI counts as none
        ({**ZEN3, "f16c": False}, "scalar"),  # AVX2 without F16C: the avx2 kernels need it
        ({"architecture": "aarch64", "asimddp": True, "i8mm": True}, "neon_dot"),
        ({"architecture": "arm64", "asimddp": True}, "neon_dot"),  # macOS' name
        ({"architecture": "aarch64"}, "neon"),
        ({"architecture": "riscv64"}, "scalar"),
        ({}, "scalar"),
        ({"architecture": "x86_64"}, "scalar"),
    ],
    ids=[
        "sapphire-rapids",
        "alder-lake",
        "zen3",
        "old-x86",
        "no-vnni",
        "no-f16c",
        "arm-i8mm",
        "apple-m",
        "cortex-a72",
        "riscv",
        "empty",
        "x86-no-keys",
    ],
)
def test_pick_isa_chooses_the_best_variant_the_cpu_runs(caps, expected):
    assert pick_isa(caps) == expected


def test_pick_isa_honours_a_request_clamped_to_the_cpu():
    assert pick_isa(SAPPHIRE_RAPIDS, "avx2") == "avx2"  # any lower variant, no warning
    assert pick_isa(SAPPHIRE_RAPIDS, "scalar") == "scalar"
    with pytest.warns(UserWarning, match="does not run it; using avx2"):
        assert pick_isa(ZEN3, "avx512_vnni") == "avx2"
    with pytest.warns(UserWarning, match="does not run it; using scalar"):
        assert pick_isa(OLD_X86, "avx_vnni") == "scalar"
    with pytest.warns(UserWarning, match="does not run it; using neon"):
        assert pick_isa({"architecture": "aarch64"}, "neon_dot") == "neon"
    with pytest.warns(UserWarning, match="does not run it; using avx2"):
        assert pick_isa(ZEN3, "neon_dot") == "avx2"  # another architecture's variant
    with pytest.warns(UserWarning, match="not one of"):
        assert pick_isa(ZEN3, "avx1024") == "avx2"


def test_this_cpu_is_described_and_its_variant_selected(monkeypatch):
    caps = cpu_capabilities()
    assert caps["architecture"] and supported_isas(caps)[-1] == "scalar"
    if kernels.gguf_matmul_available():
        assert kernels.selected_isa() == kernels.requested_isa() == torch.ops.llama2_kernels.gguf_isa()
    monkeypatch.setattr(kernels, "gguf_matmul_available", lambda: False)
    assert kernels.selected_isa() == "none"


@pytest.mark.parametrize("isa", kernels.VARIANTS)
def test_every_build_keeps_the_compiler_from_fusing_on_its_own(isa):
    for compiler, no_contraction in (
        ("gcc", "-ffp-contract=off"),
        ("apple-clang", "-ffp-contract=off"),
        ("msvc", "/fp:precise"),
    ):
        cflags, ldflags = compile_flags(isa, compiler)
        assert no_contraction in cflags and any(f"LLAMA2_ISA_{isa.upper()}" in flag for flag in cflags)
    cflags, ldflags = compile_flags(isa, "apple-clang")  # Apple clang: OpenMP through the preprocessor, torch's libomp
    assert cflags.count("-fopenmp") == 1 and cflags[-2:] == ["-Xpreprocessor", "-fopenmp"] and "-lomp" in ldflags


# --- the torch-free driver: every variant against the scalar reference, bitwise ----------

X86_FLAGS = {isa: compile_flags(isa, "gcc")[0] for isa in ("scalar", "avx2", "avx_vnni", "avx512_vnni")}


def build_driver(out: Path, compiler: str, variants: dict[str, list[str]], extra: list[str]) -> Path:
    """Compiles variant.cpp once per variant (its own flags) and links them with main.cpp."""
    common = ["-O2", "-std=c++17", "-ffp-contract=off", f"-I{KERNELS}", f"-I{DRIVER}", *extra]
    objects = []
    for isa, flags in variants.items():
        obj = out / f"{isa}.o"
        isa_flags = [f for f in flags if f.startswith(("-m", "-D"))]
        subprocess.run([compiler, *common, *isa_flags, "-c", str(DRIVER / "variant.cpp"), "-o", str(obj)], check=True)
        objects.append(str(obj))
    have = [f"-DHAVE_{isa.upper()}" for isa in variants if isa != "scalar"]
    binary = out / "selftest"
    subprocess.run([compiler, *common, *have, str(DRIVER / "main.cpp"), *objects, "-o", str(binary)], check=True)
    return binary


# Comparisons the driver makes per variant: per block type and shape (7 shapes of blocks of 32 for
# Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; 5 for the K-quants), 7 matmuls (M = 1, 2, 3, 5, 7, 16, 17; not for
# Q2_K / Q3_K) and a dequantization; then 4 row-math results at 8 sizes and 3 attention sums.
DRIVER_CHECKS = 5 * 7 * (7 + 1) + 3 * 5 * (7 + 1) + 2 * 5 * 1 + 8 * 4 + 3


def run_driver(command: list[str], variants: list[str]) -> str:
    result = subprocess.run([*command, *variants], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"ok {isa}: {DRIVER_CHECKS} comparisons bitwise equal to scalar" for isa in variants
    ]
    return result.stdout


@pytest.mark.parametrize("compiler", ["g++", "clang++"])
def test_x86_variants_equal_scalar_in_the_torch_free_driver(tmp_path, compiler):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("an x86 machine runs the x86 variants")
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    binary = build_driver(tmp_path, compiler, X86_FLAGS, [])
    runnable = [isa for isa in supported_isas(cpu_capabilities()) if isa != "scalar"]
    run_driver([str(binary)], runnable)


ARM_FLAGS = {
    "scalar": ["-march=armv8-a"],
    "neon": ["-march=armv8-a", "-DLLAMA2_ISA_NEON"],
    "neon_dot": ["-march=armv8.2-a+dotprod", "-DLLAMA2_ISA_NEON_DOT"],
}


@pytest.fixture(scope="module")
def arm_driver(tmp_path_factory) -> Path:
    """The driver for aarch64, static (qemu needs no sysroot); the dotprod code only in neon_dot's object."""
    compiler = "aarch64-linux-gnu-g++"
    if shutil.which(compiler) is None or shutil.which("qemu-aarch64") is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
    out = tmp_path_factory.mktemp("arm")
    common = ["-O2", "-std=c++17", "-ffp-contract=off", "-static", f"-I{KERNELS}", f"-I{DRIVER}"]
    objects = []
    for isa, flags in ARM_FLAGS.items():
        obj = out / f"{isa}.o"
        subprocess.run([compiler, *common, *flags, "-c", str(DRIVER / "variant.cpp"), "-o", str(obj)], check=True)
        objects.append(str(obj))
    binary = out / "selftest"
    subprocess.run(
        [
            compiler,
            *common,
            "-march=armv8-a",
            "-DHAVE_NEON",
            "-DHAVE_NEON_DOT",
            str(DRIVER / "main.cpp"),
            *objects,
            "-o",
            str(binary),
        ],
        check=True,
    )
    return binary


@pytest.mark.parametrize(
    ("cpu", "variants"), [("cortex-a72", ["neon"]), ("cortex-a76", ["neon", "neon_dot"]), ("max", ["neon", "neon_dot"])]
)
def test_arm_variants_equal_scalar_under_qemu(arm_driver, cpu, variants):
    """cortex-a72: Armv8.0 (no dot products: the baseline code must not use them); a76: dotprod; max: all."""
    run_driver(["qemu-aarch64", "-cpu", cpu, str(arm_driver)], variants)


def test_arm_dot_product_code_really_needs_the_extension(arm_driver):
    """neon_dot's object uses sdot: on a CPU without it, it stops with an illegal instruction."""
    result = subprocess.run(
        ["qemu-aarch64", "-cpu", "cortex-a72", str(arm_driver), "neon_dot"], capture_output=True, timeout=300
    )
    assert result.returncode != 0


# --- the native engine on the default model: every variant the same logits, bitwise -------


@pytest.mark.model
def test_engine_logits_are_bitwise_equal_in_every_variant(default_model_path):
    """Prefill of a real chat prompt, then 32 greedy decode steps (the scalar run's tokens), per variant."""
    from llama2.generation import Llama
    from llama2.native import NativeForward

    if not kernels.gguf_matmul_available():
        pytest.skip("llama2's kernels are off or do not build here")
    llama = Llama.build(default_model_path, max_seq_len=256, max_batch_size=1, device="cpu")
    prompt = llama.chat_format.encode_dialog_prompt(
        [{"role": "user", "content": "Why is the sky blue? Answer briefly."}]
    )
    tokens: list[int] = []
    results = {}
    for isa in supported_isas(cpu_capabilities()):
        llama.model.setup_caches(1, 256)
        native = NativeForward(llama.model, isa=isa)
        with torch.inference_mode():
            logits = [native(torch.tensor([prompt]), torch.arange(len(prompt)))[0]]  # [T, vocab]
            for step in range(32):
                if len(tokens) <= step:  # the scalar run picks the tokens
                    tokens.append(int(logits[-1][-1].argmax()))
                position = len(prompt) + step
                logits.append(native(torch.tensor([[tokens[step]]]), torch.tensor([position]))[0])
        results[isa] = torch.cat(logits)
    assert list(results)[-1] == "scalar" and len(results) >= 2
    reference = results["scalar"]
    for isa, logits in results.items():
        assert torch.equal(logits, reference), isa
