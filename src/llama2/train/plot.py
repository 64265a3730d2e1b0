"""`llama2 plot RUN_DIR`: a run's loss and learning-rate curves as PNG files (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import Llama2Error
from .metrics import METRICS_FILE, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write `loss.png` (training and validation loss) and `lr.png` for a run.

    Args:
        run_dir: the run's output folder (holding metrics.jsonl).
        output_dir: where the PNG files go (default: `run_dir`).

    Returns:
        The paths written.

    Raises:
        Llama2Error: no metrics in `run_dir`, or matplotlib is not installed.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise Llama2Error(f"{run_dir}: no {METRICS_FILE} (not a training run folder)")
    records = read_metrics(path)
    if not any("loss" in r for r in records):
        raise Llama2Error(f"{path}: no training steps logged yet")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Llama2Error("plotting needs matplotlib: pip install matplotlib") from None
    out = Path(output_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys, ylabel in (
        ("loss", ("loss", "val_loss"), "cross-entropy (nats/token)"),
        ("lr", ("lr",), "learning rate"),
    ):
        figure, axes = plt.subplots(figsize=(7, 4))
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                axes.plot(steps, values, marker="o" if key.startswith("val") else None, label=key)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.set_title(f"{Path(run_dir).name}: {name}")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        target = out / f"{name}.png"
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    return written
