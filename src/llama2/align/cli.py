"""`llama2 align ...`: the alignment stages on the command line (imports no torch until a command runs)."""

from __future__ import annotations

import argparse
import importlib
import json


def add_align_parser(commands) -> None:
    """Register `llama2 align` and its subcommands on the top-level subparsers."""
    from . import config
    from .config import add_stage_arguments

    align = commands.add_parser("align", help="RLHF: reward models, rejection sampling, PPO, GAtt, DPO")
    stages = align.add_subparsers(dest="stage", required=True, metavar="STAGE")

    for name, help_text, flags, config_name, module, runner, report in STAGES:
        stage = stages.add_parser(name, help=help_text)
        add_stage_arguments(stage, getattr(config, flags))
        stage.set_defaults(handler=stage_handler(config_name, module, runner, report))

    score = stages.add_parser("score", help="accuracy of a reward model on preference pairs")
    score.add_argument("--model", required=True, help="a reward model run folder (llama2 align rm --output-dir)")
    score.add_argument("--data", required=True, nargs="+", help="preference JSONL files")
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--unsafe-threshold", type=float, default=0.5)
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.set_defaults(handler=cmd_score)

    synthetic = stages.add_parser("synthetic", help="write the synthetic preference and prompt sets (miniature runs)")
    synthetic.add_argument("output_dir")
    synthetic.add_argument("--pairs", type=int, default=400)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.set_defaults(handler=cmd_synthetic)


def stage_handler(config_name: str, module: str, runner: str, report=None):
    """A handler that resolves the stage's config (`.config.CONFIG_NAME`), runs `.MODULE.RUNNER` on it,
    and prints `report(result)` when given."""

    def handler(args: argparse.Namespace) -> int:
        from . import config

        stage_config = config.config_from_stage_args(args, getattr(config, config_name))
        result = getattr(importlib.import_module(f".{module}", __package__), runner)(stage_config)
        if report is not None:
            report(result)
        return 0

    return handler


def report_accuracy(last: dict) -> None:
    if "val_accuracy" in last:
        print(f"held-out accuracy {last['val_accuracy']:.3f} on {last['val_pairs']} pairs")


def report_adherence(result: dict) -> None:
    for name in ("before", "after"):
        print(f"adherence {name}: " + " ".join(f"{rate:.2f}" for rate in result[name]))


def cmd_score(args: argparse.Namespace) -> int:
    from .rm import score_pairs

    metrics = score_pairs(args.model, args.data, args.batch_size, args.unsafe_threshold)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"accuracy {metrics['accuracy']:.3f} on {metrics['pairs']} pairs")
    for rating, accuracy in metrics["per_rating"].items():
        print(f"  {rating:<20} {accuracy:.3f}")
    if "unsafe_recall" in metrics:
        print(f"unsafe precision {metrics['unsafe_precision']:.3f} recall {metrics['unsafe_recall']:.3f}")
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic

    for path in write_synthetic(args.output_dir, args.pairs, args.seed):
        print(path)
    return 0


# The training stages: (subcommand, help, flags in .config, config class, module, runner, report function).
# fmt: off
STAGES = (
    ("rm", "train a reward model on preference pairs (rerun to resume)",
     "REWARD_FLAGS", "RewardConfig", "rm", "run_reward_training", report_accuracy),
    ("rejection-sampling", "best-of-K answers by a reward model, then SFT on them (rerun to resume)",
     "REJECTION_FLAGS", "RejectionConfig", "rejection", "run_rejection_sampling", None),
    ("ppo", "PPO on Llama 2's reward (R_c, KL penalty); rerun to resume",
     "PPO_FLAGS", "PPOConfig", "ppo", "run_ppo", None),
    ("gatt", "Ghost Attention: multi-turn instruction data, SFT, adherence per turn",
     "GATT_FLAGS", "GattConfig", "gatt", "run_gatt", report_adherence),
    ("distill", "safety context distillation (preprompted answers the safety RM prefers)",
     "DISTILL_FLAGS", "DistillConfig", "distill", "run_distillation", None),
    ("dpo", "direct preference optimization on preference pairs (rerun to resume)",
     "DPO_FLAGS", "DPOConfig", "dpo", "run_dpo", report_accuracy),
)
# fmt: on
