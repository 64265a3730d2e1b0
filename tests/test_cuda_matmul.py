"""llama2's Triton weight-only matmuls (`llama2.kernels.cuda_matmul`) against float64 references.

The packing runs everywhere; the kernels need a CUDA GPU with Triton and skip without one.
"""

import pytest
import torch
from torch import nn

from llama2.kernels import cuda_matmul
from llama2.kernels.cuda_matmul import pack_int4_codes, unpack_int4_codes, weight_only_matmul
from llama2.quant import Int8Linear

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_matmul.HAS_TRITON), reason="needs a CUDA GPU and Triton"
)


def test_int4_codes_pack_as_gguf_q4_nibbles():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4_codes(codes)
    assert packed.shape == (3, 32)
    # GGUF Q4: byte j of a 32-value run holds value j (low nibble) and value j + 16 (high nibble)
    assert int(packed[1, 16 + 5]) == int(codes[1, 32 + 5]) | int(codes[1, 32 + 21]) << 4
    assert torch.equal(unpack_int4_codes(packed), codes)


def test_rows_beyond_one_tile_are_refused():
    with pytest.raises(ValueError, match="at most 16 rows"):
        weight_only_matmul(torch.zeros(17, 64), torch.zeros(8, 64), "bf16")


def reference(kind, x, weight, scale=None, zero=None, group=32):
    if kind == "bf16":
        w = weight.double()
    elif kind == "int8":
        w = weight.double() * scale.double()[:, None]
    else:
        codes = unpack_int4_codes(weight).double()
        n, k = codes.shape
        w = ((codes.view(n, k // group, group) - 8) * scale.double()[..., None] + zero.double()[..., None]).view(n, k)
    return x.double() @ w.T


def random_weights(kind, n, k, group=32, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(n * k)
    if kind == "bf16":
        return {"weight": torch.randn(n, k, generator=gen, device=device).bfloat16()}
    if kind == "int8":
        return {
            "weight": torch.randint(-128, 128, (n, k), generator=gen, device=device, dtype=torch.int8),
            "scale": torch.rand(n, generator=gen, device=device).bfloat16(),
        }
    codes = torch.randint(0, 16, (n, k), generator=gen, device=device, dtype=torch.uint8)
    return {
        "weight": pack_int4_codes(codes),
        "scale": torch.rand(n, k // group, generator=gen, device=device).bfloat16(),
        "zero": torch.randn(n, k // group, generator=gen, device=device).bfloat16(),
        "group_size": group,
    }


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_weight_only_matmul_matches_float64(kind, split, rows):
    n, k = 200, 1376  # n not a multiple of the tile; k = 43 runs of 32
    w = random_weights(kind, n, k)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    config = {**cuda_matmul.DEFAULT_CONFIGS[kind], "SPLIT": split}
    out = torch.full((rows, n), float("nan"), device="cuda")
    out[:] = weight_only_matmul(x, **w, kind=kind, config=config).float()
    expected = reference(kind, x, **w)
    assert out.isfinite().all()
    # the output is rounded to bfloat16 (~1.7e-3 relative on H200: gpu_gemv.py's check)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 4e-3


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_a_row_is_the_same_in_any_batch(kind):
    w = random_weights(kind, 96, 512)
    x = torch.randn(16, 512, device="cuda").bfloat16()
    batch = weight_only_matmul(x, **w, kind=kind)
    for i in (0, 7, 15):
        assert torch.equal(weight_only_matmul(x[i : i + 1], **w, kind=kind)[0], batch[i])


@needs_cuda
@pytest.mark.gpu
def test_decode_layers_run_the_kernel_in_compiled_cuda_graphs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(256, 512, bias=False)).cuda().bfloat16()
    model[1] = Int8Linear.from_float(model[1].weight.float())
    expected = model(torch.ones(1, 512, device="cuda").bfloat16()).double()
    assert cuda_matmul.use_for_decode(model) == 2
    step = torch.compile(model, options={"triton.cudagraphs": True})
    for _ in range(3):  # warm-up, recording, replay
        out = step(torch.ones(1, 512, device="cuda").bfloat16())
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
