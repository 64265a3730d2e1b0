"""Training metrics: the JSONL log (and TensorBoard when installed), FLOP and MFU estimates."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import ModelArgs

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s of common accelerators, matched against the device name.
GPU_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


class MetricsLog:
    """Appends one JSON object per line to OUTPUT_DIR/metrics.jsonl (and TensorBoard scalars).

    On resume, lines past the checkpoint's step are dropped first, so the file always
    holds exactly the run's history up to the current step.
    """

    def __init__(self, output_dir: Path, resume_step: int, tensorboard: bool = True):
        self.path = output_dir / METRICS_FILE
        self._truncate_after(resume_step)
        self._writer = _tensorboard_writer(output_dir / "tensorboard") if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= step]
        temp = self.path.with_name(f".{self.path.name}.tmp")
        temp.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        temp.replace(self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (unparseable lines, e.g. a torn last line, skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def flops_per_token(args: ModelArgs, seq_len: int, frozen_base: bool = False) -> float:
    """Model FLOPs per trained token: 6 per matmul weight plus attention (PaLM, appendix B).

    The embedding lookup is no matmul; the output head is one even when tied to it. A
    frozen base (LoRA) needs no weight gradients: 4 per weight (forward and input
    gradients; the small adapters are left out). Recomputation (activation
    checkpointing) is not counted, as is usual for MFU.
    """
    matmul_params = args.num_params() - args.vocab_size * args.dim * (0 if args.tie_word_embeddings else 1)
    per_weight = 4 if frozen_base else 6
    return per_weight * matmul_params + 12 * args.n_layers * args.dim * seq_len


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device: `override_tflops`, a table for known GPUs, or a measured CPU matmul rate."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in GPU_PEAK_FLOPS if key in name), 312e12)
    return measured_matmul_flops(dtype)


def measured_matmul_flops(dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls on this CPU: the best observed rate stands in for its peak."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, resume) alone
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best
