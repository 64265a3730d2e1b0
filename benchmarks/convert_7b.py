"""Time and peak memory of converting a Llama-2-7B-shaped model (random weights) HF -> GGUF Q4_0.

    python benchmarks/convert_7b.py --work /tmp/convert-7b [--keep]

1. Writes a random Llama-2-7B-shaped Hugging Face folder (bf16 safetensors in 5 GB
   shards, Meta's tokenizer.model and its real 32000-token vocabulary), generating and
   writing one tensor at a time, so the script itself never holds the model.
2. Runs `/usr/bin/time -v llama2 convert SRC DST --to gguf --type q4_0` and reports the
   wall time and the maximum resident set size of the conversion.
3. Checks the output with gguf-py's reader (tensor count and types) and compares one
   tensor's blocks with `gguf.quants.quantize` of the source tensor.
4. Deletes the files unless --keep.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llama2.config import model_args_from_preset
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.weights import LazyStateDict, open_hf, write_hf
from llama2.weights.checkpoint import TensorSpec, expected_shapes


def random_model(folder: Path) -> None:
    args = model_args_from_preset("llama2-7b")
    specs = {name: TensorSpec(shape, torch.bfloat16) for name, shape in expected_shapes(args).items()}
    seeds = {name: i for i, name in enumerate(specs)}

    def generate(name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seeds[name])
        return (torch.randn(specs[name].shape, generator=generator) * 0.02).to(torch.bfloat16)

    write_hf(args, LazyStateDict(specs, generate), folder, tokenizer=Tokenizer.from_file(llama2_tokenizer_path()))


def timed_convert(source: Path, dest: Path) -> dict:
    llama2 = Path(sys.executable).with_name("llama2")
    command = ["/usr/bin/time", "-v", str(llama2), "convert", str(source), str(dest), "--to", "gguf", "--type", "q4_0"]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    return {"wall_s": wall, "max_rss_gib": rss_kb / 1024**2, "command": " ".join(command[2:])}


def check_output(source: Path, dest: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(dest)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    wq = open_hf(source).state_dict["layers.0.attention.wq.weight"]  # one tensor, in Meta's layout
    blocks = gguf.quants.quantize(wq.float().numpy(), gguf.GGMLQuantizationType.Q4_0)
    written = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    same = np.array_equal(np.asarray(written.data).reshape(-1), blocks.reshape(-1))
    return f"{len(reader.tensors)} tensors {types}; blk.0.attn_q blocks equal gguf.quants.quantize: {same}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert-7b"))
    parser.add_argument("--keep", action="store_true", help="keep the 13.5 GB source and the 3.8 GB output")
    args = parser.parse_args()
    source, dest = args.work / "llama-2-7b-random-hf", args.work / "llama-2-7b-random.Q4_0.gguf"
    try:
        if not source.is_dir():
            start = time.perf_counter()
            random_model(source)
            print(f"wrote {source} in {time.perf_counter() - start:.0f} s", flush=True)
        size = sum(path.stat().st_size for path in source.iterdir()) / 1024**3
        result = timed_convert(source, dest)
        print(
            f"{result['command']}\n  source {size:.2f} GiB -> {dest.stat().st_size / 1024**3:.2f} GiB; "
            f"wall {result['wall_s']:.0f} s; max RSS {result['max_rss_gib']:.2f} GiB"
        )
        print(f"  {check_output(source, dest)}")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
