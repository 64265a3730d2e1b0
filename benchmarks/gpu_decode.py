"""Batch-1 decode speed of a Llama-2-7B-shaped random-weight model on a CUDA GPU, eager.

Prints tokens/s and the fraction of the HBM-bandwidth bound (weights read once per token).
Usage: python benchmarks/gpu_decode.py [--preset llama2-7b] [--bandwidth-gbs 4800]
"""

import argparse
import time

import torch

from llama2.config import model_args_from_preset
from llama2.model import Transformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="HBM bandwidth (H200 4800, H100 SXM 3350)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    model_args = model_args_from_preset(args.preset)
    with torch.device("meta"):
        model = Transformer(model_args)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.setup_caches(1, args.prompt_len + args.steps + 8)
    tokens = torch.randint(0, model_args.vocab_size, (1, args.prompt_len), device="cuda")
    with torch.inference_mode():
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(tokens, torch.arange(args.prompt_len, device="cuda"), last_logits_only=True)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for step in range(args.steps):
            pos = torch.tensor([args.prompt_len + step], device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(next_token, pos, last_logits_only=True)
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    median = sorted(times[4:])[len(times[4:]) // 2]
    bound = args.bandwidth_gbs * 1e9 / weight_bytes
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  preset {args.preset}")
    print(f"weights {weight_bytes / 1e9:.2f} GB bf16; prefill {args.prompt_len} tokens {args.prompt_len / prefill_s:.0f} tok/s")
    print(f"decode (eager, median of {len(times) - 4}) {1 / median:.1f} tok/s; bandwidth bound {bound:.0f} tok/s; "
          f"fraction {1 / median / bound:.2f}")


if __name__ == "__main__":
    main()
