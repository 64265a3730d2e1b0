"""`TrainConfig`: one training run's settings, with Llama 2's recipes as defaults.

A run is described by an optional YAML file whose keys are `TrainConfig` field names,
overridden by command-line flags (`add_train_arguments`). Fields left unset (None) are
filled by `TrainConfig.resolved()` from the mode's paper defaults:

- pretraining (Llama 2 paper, section 2.2): AdamW (beta1 0.9, beta2 0.95, eps 1e-5),
  weight decay 0.1, gradient clipping 1.0, cosine schedule with 2000 warmup steps down
  to 10% of the peak learning rate, peak 3e-4 (7B/13B), 4M-token batches (1024 x 4096);
- supervised fine-tuning (section 3.1): the same optimizer, cosine schedule from 2e-5,
  weight decay 0.1, batch 64 x 4096 tokens, loss on answer tokens only, examples packed;
- LoRA/QLoRA (Hu et al. 2021; Dettmers et al. 2023): adapters on all linear layers of the
  blocks, alpha 16, dropout 0.05, learning rate 2e-4.

This module imports no torch, so building the command line stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Llama2Error
from ..weights.registry import DEFAULT_MODEL

MODES = ("pretrain", "sft")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
QLORA_TYPES = ("nf4", "int8")
EXPORT_FORMATS = ("meta", "hf", "gguf", "none")
DATA_LAYOUTS = ("pack", "pad")

PRETRAIN_WARMUP_STEPS = 2000
_DEFAULT_LR = {"pretrain": 3e-4, "sft": 2e-5, "lora": 2e-4}
_DEFAULT_BATCH = {"pretrain": 1024, "sft": 64}
_DEFAULT_MODEL = {"pretrain": "tiny", "sft": DEFAULT_MODEL}
CONFIG_FILE = "config.yaml"  # the resolved config a run writes into its output folder
PAPER_SEQ_LEN = 4096  # tokens per sequence in pretraining and SFT


@dataclass
class TrainConfig:
    """Settings of one training run (see the module docstring for the defaults' sources).

    Attributes:
        mode: "pretrain" (next-token loss on every token) or "sft" (chat dialogs, loss on
            the assistant's answers only).
        output_dir: run folder: checkpoints, metrics.jsonl, prepared data, exported model.
        data: training data: text/JSONL files or folders of them, or a folder prepared
            before (holding `index.json`).
        model: a preset name (random initialization, e.g. "tiny") or anything
            `load_checkpoint` reads. Default: "tiny" to pretrain, the default model for SFT.
        tokenizer: tokenizer file to use instead of the model's own (presets use Llama 2's).
        chat_format: chat format override for SFT (llama-2, chatml, a template).
        val_data: held-out data, prepared like `data`, for validation loss and perplexity.
        max_steps: optimizer steps of the whole run.
        batch_size: global batch in sequences, whatever the number of processes.
        micro_batch_size: sequences per forward pass on one process (gradient
            accumulation makes up the rest). Default: at most 4.
        seq_len: tokens per sequence. Default: 4096 capped at the model's context.
        lr: peak learning rate. Default: 3e-4 pretraining, 2e-5 SFT, 2e-4 with LoRA.
        min_lr_ratio: final learning rate as a fraction of the peak.
        warmup_steps: linear warmup steps. Default: 2000 for pretraining (capped at a tenth
            of max_steps for short runs), none for SFT.
        betas, eps, weight_decay, grad_clip: AdamW and clipping (weight decay on matrices only).
        layout: "pack" (examples packed into full rows, attention kept inside each example)
            or "pad" (one example per row, padded).
        document_mask: in packed rows, keep attention inside each example (else plain causal
            attention across the row, as Llama 2's pretraining).
        lora_rank: LoRA rank; 0 trains all weights.
        lora_alpha, lora_dropout, lora_targets: LoRA scaling, dropout and target modules.
        qlora: store the frozen base of a LoRA run as "nf4" or "int8" (QLoRA).
        bf16: bfloat16 autocast (default: on CUDA when supported; off on CPU).
        activation_checkpointing: recompute each block's activations in the backward pass.
        compile: torch.compile each block (default: on CUDA).
        seed: seed of initialization, data order and dropout.
        save_every: write a checkpoint every this many steps (and at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        eval_every: validate every this many steps (0: only at the start and the end).
        eval_batches: most validation batches per evaluation (0: all).
        log_every: append a metrics line every this many steps.
        export: format of the final model written to OUTPUT_DIR/final.
        device: cpu, cuda, cuda:1 ... (default: CUDA when available; torchrun's local rank).
        peak_tflops: accelerator peak for the MFU estimate (default: a table for known
            GPUs, a measured matmul rate on CPU).
    """

    mode: str = "pretrain"
    output_dir: str | None = None
    data: list[str] = field(default_factory=list)
    model: str | None = None
    tokenizer: str | None = None
    chat_format: str | None = None
    val_data: list[str] = field(default_factory=list)
    max_steps: int = 1000
    batch_size: int | None = None
    micro_batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    layout: str = "pack"
    document_mask: bool = True
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    qlora: str | None = None
    bf16: bool | None = None
    activation_checkpointing: bool = False
    compile: bool | None = None
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_batches: int = 0
    log_every: int = 1
    export: str = "meta"
    device: str | None = None
    peak_tflops: float | None = None

    def resolved(self) -> TrainConfig:
        """A copy with mode-dependent defaults filled in, validated.

        Raises:
            Llama2Error: a missing or inconsistent setting.
        """
        c = dataclasses.replace(self)
        _check_choice("mode", c.mode, MODES)
        if c.output_dir is None:
            raise Llama2Error("no output folder: give --output-dir or output_dir in the config file")
        if not c.data:
            raise Llama2Error("no training data: give --data or data in the config file")
        c.model = c.model or _DEFAULT_MODEL[c.mode]
        c.batch_size = c.batch_size or _DEFAULT_BATCH[c.mode]
        if c.lr is None:
            c.lr = _DEFAULT_LR["lora" if c.lora_rank else c.mode]
        if c.warmup_steps is None:
            c.warmup_steps = min(PRETRAIN_WARMUP_STEPS, c.max_steps // 10) if c.mode == "pretrain" else 0
        c.validate()
        return c

    def validate(self) -> None:
        """Raise `Llama2Error` for values no run can use."""
        _check_choice("layout", self.layout, DATA_LAYOUTS)
        _check_choice("export", self.export, EXPORT_FORMATS)
        if self.qlora is not None:
            _check_choice("qlora", self.qlora, QLORA_TYPES)
            if not self.lora_rank:
                raise Llama2Error("qlora needs LoRA adapters: give --lora-rank too")
        for target in self.lora_targets:
            _check_choice("lora target", target, LORA_TARGETS)
        positive = ("max_steps", "batch_size", "save_every", "log_every", "keep_checkpoints")
        optional_positive = ("micro_batch_size", "seq_len")
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise Llama2Error(f"{name} must be positive, got {value}")
        for name in ("lora_rank", "warmup_steps", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise Llama2Error(f"{name} must not be negative, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise Llama2Error(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.lora_dropout < 1:
            raise Llama2Error("min_lr_ratio must be in [0, 1] and lora_dropout in [0, 1)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise Llama2Error(f"unknown {name} {value!r} (expected one of {', '.join(choices)})")


# ---------------------------------------------------------------------------- YAML


def load_config(path: str | Path | None, overrides: dict | None = None, cls: type = TrainConfig) -> TrainConfig:
    """A `TrainConfig` from a YAML file (optional) with `overrides` applied on top.

    Args:
        path: YAML mapping of field names (hyphens or underscores) to values, or None.
        overrides: field name -> value, e.g. from command-line flags.
        cls: `TrainConfig` or a subclass of it with more settings (e.g. an alignment stage's).

    Raises:
        Llama2Error: an unreadable file, an unknown key or a value of the wrong type.
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    values.update(overrides or {})
    return config_from_dict(values, source=str(path) if path else "flags", cls=cls)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write `config` as YAML (loadable by `load_config`), atomically."""
    import yaml

    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    temp.replace(path)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Llama2Error(f"{path}: not a readable YAML config ({first_line})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise Llama2Error(f"{path}: a config file must be a mapping of settings")
    return values


def config_from_dict(values: dict, source: str = "config", cls: type = TrainConfig) -> TrainConfig:
    """Build a `TrainConfig` (or `cls`, a subclass), checking every key and the type of every value."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise Llama2Error(f"{source}: unknown setting {key!r}")
        fields[name] = _coerce(name, value, hints[name], source)
    return cls(**fields)


def _coerce(name: str, value, hint, source: str):
    """`value` converted to the field's type (ints accepted as floats, a string as a one-item list)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise Llama2Error(f"{source}: {name} cannot be empty")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    if origin is list:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise Llama2Error(f"{source}: {name} must be a string or a list of strings")
        return list(items)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            raise Llama2Error(f"{source}: {name} must be a list of two numbers")
        return tuple(float(v) for v in value)
    if base is float and _is_number(value):
        return float(value)
    if base in (int, bool, str) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise Llama2Error(f"{source}: {name} must be of type {base.__name__}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- flags

# (flag, field, argparse options): the common settings, overriding the config file.
_FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--model", "model", dict(help="preset name (random init) or checkpoint to start from")),
    ("--tokenizer", "tokenizer", dict(help="tokenizer file instead of the model's own")),
    ("--chat-format", "chat_format", dict(help="chat format override for SFT data")),
    ("--data", "data", dict(nargs="+", help="training files/folders (text, JSONL) or a prepared folder")),
    ("--val-data", "val_data", dict(nargs="+", help="validation files/folders")),
    ("--output-dir", "output_dir", dict(help="run folder (running again resumes from its last checkpoint)")),
    ("--max-steps", "max_steps", dict(type=int)),
    ("--batch-size", "batch_size", dict(type=int, help="global batch in sequences")),
    ("--micro-batch-size", "micro_batch_size", dict(type=int, help="sequences per forward pass per process")),
    ("--seq-len", "seq_len", dict(type=int)),
    ("--lr", "lr", dict(type=float, help="peak learning rate")),
    ("--warmup-steps", "warmup_steps", dict(type=int)),
    ("--layout", "layout", dict(choices=DATA_LAYOUTS, help="pack examples into full rows or pad each")),
    ("--lora-rank", "lora_rank", dict(type=int, help="train LoRA adapters of this rank (0: all weights)")),
    ("--lora-alpha", "lora_alpha", dict(type=float)),
    ("--lora-dropout", "lora_dropout", dict(type=float)),
    ("--lora-targets", "lora_targets", dict(nargs="+", choices=LORA_TARGETS)),
    ("--qlora", "qlora", dict(choices=QLORA_TYPES, help="keep the frozen base in 4-bit NF4 or int8")),
    ("--bf16", "bf16", dict(action=argparse.BooleanOptionalAction, help="bfloat16 autocast")),
    ("--activation-checkpointing", "activation_checkpointing", dict(action=argparse.BooleanOptionalAction)),
    ("--compile", "compile", dict(action=argparse.BooleanOptionalAction, help="torch.compile the blocks")),
    ("--seed", "seed", dict(type=int)),
    ("--save-every", "save_every", dict(type=int, help="checkpoint every N steps")),
    ("--eval-every", "eval_every", dict(type=int, help="validate every N steps")),
    ("--export", "export", dict(choices=EXPORT_FORMATS, help="format of OUTPUT_DIR/final")),
    ("--device", "device", dict()),
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `llama2 train`'s positional arguments and override flags to `parser`."""
    parser.add_argument("mode", choices=MODES, help="pretrain (text) or sft (chat dialogs)")
    parser.add_argument("config", nargs="?", help="YAML file of TrainConfig settings")
    add_override_flags(parser, _FLAGS)


def add_override_flags(parser: argparse.ArgumentParser, flags: tuple[tuple[str, str, dict], ...] = _FLAGS) -> None:
    """Add (flag, field, argparse options) override flags; `overrides_from_args` reads them back."""
    for flag, name, options in flags:
        if "action" not in options and "choices" not in options:
            options = {"metavar": name.upper(), **options}
        parser.add_argument(flag, dest=f"set_{name}", default=None, **options)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Field name -> value of every override flag given on the command line."""
    return {
        key[len("set_") :]: value for key, value in vars(args).items() if key.startswith("set_") and value is not None
    }


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the YAML file, then the flags given, then the mode's defaults."""
    overrides = overrides_from_args(args)
    overrides["mode"] = args.mode
    return load_config(args.config, overrides).resolved()
