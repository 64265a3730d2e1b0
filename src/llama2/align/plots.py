"""PNG plots of an alignment run's metrics.jsonl: one figure per group of series."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..train.metrics import METRICS_FILE, read_metrics

SFT_PLOTS = {"loss": ("loss", "val_loss"), "lr": ("lr",)}


def plot_stage(run_dir: str | os.PathLike, groups: Mapping[str, Sequence[str]]) -> list[Path]:
    """Write RUN_DIR/NAME.png for each group NAME -> metric keys that has data; returns the paths.

    Plotting is skipped (an empty list) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    path = Path(run_dir) / METRICS_FILE
    records = read_metrics(path) if path.is_file() else []
    written = []
    for name, keys in groups.items():
        series = {key: [(r["step"], r[key]) for r in records if key in r and "step" in r] for key in keys}
        series = {key: points for key, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        for key, points in series.items():
            axes.plot(
                [s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None, label=key
            )
        axes.set_xlabel("step")
        axes.set_title(f"{Path(run_dir).name}: {name}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        target = Path(run_dir) / f"{name}.png"
        figure.savefig(target, dpi=100)
        plt.close(figure)
        written.append(target)
    return written


def run_stage(trainer_class, config, plots: Mapping[str, Sequence[str]], **options) -> dict:
    """Train `trainer_class(config, env, **options)` on this process (joining torchrun's group if any),
    then plot `plots` on rank 0; returns the last metrics."""
    from ..train.distributed import init_distributed, shutdown

    env = init_distributed(config.device)
    try:
        last = trainer_class(config, env, **options).train()
        if env.is_main:
            plot_stage(config.output_dir, plots)
        return last
    finally:
        shutdown(env)
