"""Weight-only matrix-vector products on CUDA at Llama-2-7B shapes, against the HBM bound.

For each weight kind (bf16, int8 per row, int4 groups of 32) and each shape of a 7B
decode step, times llama2's Triton kernel (`llama2.kernels.cuda_matmul`) over a grid of
tile settings, and the stock path PyTorch offers (cuBLAS for bf16 and int8, tinygemm's
`_weight_int4pack_mm` for int4), as CUDA-graph replays over rotating weight copies larger
than the L2 cache. Prints GB/s of weight bytes read and the best setting per shape, and
the settings as a Python dict for `TUNED_CONFIGS`.

Usage: python benchmarks/gpu_gemv.py [--rows 1] [--kinds bf16,int8,int4] [--out results.json]
       [--tuned-out tuned.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from llama2.kernels.cuda_matmul import pack_int4_codes, weight_only_matmul

SHAPES_7B = {
    "wqkv": (12288, 4096),
    "wo": (4096, 4096),
    "w13": (22016, 4096),
    "w2": (4096, 11008),
    "output": (32000, 4096),
}
GRIDS = {  # per kind: the tile settings tried
    "bf16": {"BLOCK_N": (32, 64), "BLOCK_K": (256,), "SPLIT": (1, 2, 4), "num_warps": (4,), "num_stages": (3,)},
    "int8": {"BLOCK_N": (32, 64), "BLOCK_K": (256,), "SPLIT": (1, 2, 4), "num_warps": (4,), "num_stages": (3,)},
    "int4": {"BLOCK_N": (16, 32), "BLOCK_K": (256,), "SPLIT": (1, 2, 4), "num_warps": (4, 8), "num_stages": (3,)},
}
L2_BYTES = 60 * 2**20


def make_weights(kind: str, n: int, k: int, device: str) -> dict:
    """Random weights of one kind: the kernel's arguments and the stock path's."""
    if kind == "bf16":
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        return {"weight": w, "bytes": w.numel() * 2}
    if kind == "int8":
        w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        scale = torch.rand(n, device=device, dtype=torch.bfloat16)
        return {"weight": w, "scale": scale, "bytes": w.numel() + n * 2}
    codes = torch.randint(0, 16, (n, k), device=device, dtype=torch.uint8)
    scale = torch.rand(n, k // 32, device=device, dtype=torch.bfloat16) / 8
    zero = torch.randn(n, k // 32, device=device, dtype=torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous(), 2)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    return {
        "weight": pack_int4_codes(codes),
        "scale": scale,
        "zero": zero,
        "tinygemm": (packed, scales_and_zeros),
        "bytes": n * k // 2 + 2 * n * (k // 32) * 2,
    }


def stock(kind: str, x: torch.Tensor, w: dict) -> torch.Tensor:
    if kind == "bf16":
        return F.linear(x, w["weight"])
    if kind == "int8":
        return F.linear(x, w["weight"].to(x.dtype)) * w["scale"]
    packed, scales_and_zeros = w["tinygemm"]
    return torch.ops.aten._weight_int4pack_mm(x, packed, 32, scales_and_zeros)


def ours(kind: str, x: torch.Tensor, w: dict, config: dict) -> torch.Tensor:
    return weight_only_matmul(x, w["weight"], kind, w.get("scale"), w.get("zero"), 32, config)


def time_rotating(fn, copies: list[dict]) -> float:
    """Seconds per call, from CUDA-graph replays of one call on each copy in turn."""
    import triton.testing

    def run():
        for w in copies:
            fn(w)

    run()  # compiles outside the graph capture
    return triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median") / 1e3 / len(copies)


def bench_shape(kind: str, name: str, n: int, k: int, rows: int) -> dict:
    w0 = make_weights(kind, n, k, "cuda")
    copies = [w0] + [make_weights(kind, n, k, "cuda") for _ in range(max(1, -(-2 * L2_BYTES // w0["bytes"])) - 1)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    reference = x.float() @ dequantized(kind, w0).T
    results = {"stock": None, "ours": []}
    try:
        results["stock"] = w0["bytes"] / time_rotating(lambda w: stock(kind, x, w), copies) / 1e9
    except RuntimeError as err:
        print(f"  stock {kind} {name}: {err}".splitlines()[0])
    grid = GRIDS[kind]
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        out = ours(kind, x, w0, config).float()
        error = ((out - reference).norm() / reference.norm()).item()
        if not error < 1e-2:
            raise AssertionError(f"{kind} {name} {config}: relative error {error}")
        gbs = w0["bytes"] / time_rotating(lambda w, c=config: ours(kind, x, w, c), copies) / 1e9
        results["ours"].append({"config": config, "gbs": round(gbs, 1), "error": error})
    results["ours"].sort(key=lambda r: -r["gbs"])
    return results


def dequantized(kind: str, w: dict) -> torch.Tensor:
    if kind == "bf16":
        return w["weight"].float()
    if kind == "int8":
        return w["weight"].float() * w["scale"].float()[:, None]
    n = w["weight"].shape[0]
    codes = torch.stack((w["weight"].reshape(n, -1, 16) & 15, w["weight"].reshape(n, -1, 16) >> 4), 2).reshape(n, -1)
    groups = codes.float().reshape(n, -1, 32)
    return ((groups - 8) * w["scale"].float()[..., None] + w["zero"].float()[..., None]).reshape(n, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--kinds", default="bf16,int8,int4")
    parser.add_argument("--shapes", default=",".join(SHAPES_7B))
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0)
    parser.add_argument("--out", help="every measurement as JSON")
    parser.add_argument("--tuned-out", help="the best setting per shape as JSON")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, rows {args.rows}")
    table, tuned = [], {}
    for kind in args.kinds.split(","):
        for name in args.shapes.split(","):
            n, k = SHAPES_7B[name]
            r = bench_shape(kind, name, n, k, args.rows)
            best = r["ours"][0]
            tuned[(kind, n, k)] = best["config"]
            table.append(
                {
                    "kind": kind,
                    "shape": name,
                    "n": n,
                    "k": k,
                    "stock_gbs": r["stock"],
                    "best_gbs": best["gbs"],
                    "best": best["config"],
                    "top3": r["ours"][:3],
                }
            )
            stock_gbs = f"{r['stock']:.0f}" if r["stock"] else "-"
            print(
                f"{kind:<5}{name:<7}{n:>6}x{k:<6} stock {stock_gbs:>5} GB/s  ours {best['gbs']:>6.0f} GB/s "
                f"({best['gbs'] / args.bandwidth_gbs:.2f} of bound)  {best['config']}",
                flush=True,
            )
    print("TUNED_CONFIGS =", {str(key): value for key, value in tuned.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    if args.tuned_out:  # for `gpu_decode.py --matmul-configs`
        with open(args.tuned_out, "w") as f:
            json.dump([[kind, n, k, config] for (kind, n, k), config in tuned.items()], f)


if __name__ == "__main__":
    main()
