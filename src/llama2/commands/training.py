"""Commands of training: train (pretrain, fine-tune) and plot."""

from __future__ import annotations

import argparse

from ..train.config import add_train_arguments


def add_training_parsers(commands) -> None:
    """Register train and plot on `commands` (argparse subparsers)."""
    train = commands.add_parser("train", help="pretrain or fine-tune (full, LoRA, QLoRA); rerun to resume")
    add_train_arguments(train)
    train.set_defaults(handler=cmd_train)

    plot = commands.add_parser("plot", help="plot a training run's loss and learning rate as PNG")
    plot.add_argument("run_dir", help="the run's --output-dir")
    plot.add_argument("--output", "-o", help="folder for the PNG files (default: RUN_DIR)")
    plot.set_defaults(handler=cmd_plot)


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import config_from_args
    from ..train.trainer import run_training

    run_training(config_from_args(args))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..train.plot import plot_run

    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
