"""The model a run trains: a preset initialized from scratch or a loaded checkpoint, made ready
for its device (LoRA/QLoRA, activation checkpointing, torch.compile, FSDP2)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PRESETS, ModelArgs, model_args_from_preset
from ..loader import check_vocabulary, load_model
from ..model import Transformer, meta_transformer
from ..tokenizer import Tokenizer, llama2_tokenizer_path
from .config import TrainConfig
from .distributed import DistributedEnv, shard_model
from .lora import LoRAConfig, apply_lora

INIT_STD = 0.02


@dataclass
class TrainingModel:
    """A model to train, with what it was made from.

    Attributes:
        model: the `Transformer` (unsharded, float32).
        args: its architecture.
        tokenizer: its tokenizer.
        chat_template: the checkpoint's chat template, if any.
        source: the preset name or checkpoint path.
    """

    model: Transformer
    args: ModelArgs
    tokenizer: Tokenizer
    chat_template: str | None
    source: str


def init_weights(model: Transformer) -> None:
    """GPT-2 style initialization: normal(0, 0.02) weights, residual projections (wo, w2)
    scaled by 1/sqrt(2 * layers), norms at one. Uses the global torch RNG."""
    residual_std = INIT_STD / math.sqrt(2 * model.args.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else INIT_STD
                param.normal_(0.0, std)


def load_training_model(config: TrainConfig, device: torch.device | None = None) -> TrainingModel:
    """A preset or a checkpoint, in float32 on `device` (default: the CPU), in training mode.

    A preset is built on the meta device and initialized in place on `device` (no
    full-size CPU copy) with the current torch seed; it uses Llama 2's tokenizer unless
    `config.tokenizer` names another.

    Raises:
        Llama2Error: an unreadable model or a tokenizer bigger than the embeddings.
    """
    device = device or torch.device("cpu")
    if config.model in PRESETS:
        args = model_args_from_preset(config.model)
        tokenizer = Tokenizer.from_file(config.tokenizer or llama2_tokenizer_path())
        check_vocabulary(tokenizer, args, config.model)
        model = meta_transformer(args)
        model.to_empty(device=device)
        init_weights(model)
        loaded = TrainingModel(model, args, tokenizer, tokenizer.chat_template, config.model)
    else:
        found = load_model(config.model, config.tokenizer, device=device, dtype=torch.float32, quant="none", fuse=False)
        loaded = TrainingModel(found.model, found.args, found.tokenizer, found.chat_template, found.source)
    loaded.model.train()
    return loaded


def lora_config(config: TrainConfig) -> LoRAConfig | None:
    """The run's LoRA settings, or None for full training."""
    if not config.lora_rank:
        return None
    return LoRAConfig(config.lora_rank, config.lora_alpha, config.lora_dropout, list(config.lora_targets), config.qlora)


def prepare_model(model: Transformer, config: TrainConfig, env: DistributedEnv, bf16: bool) -> nn.Module:
    """Device, adapters (quantizing a QLoRA base there), activation checkpointing,
    compilation, then FSDP2 (in this order).

    Returns:
        The module to train (the same `Transformer`, changed in place).
    """
    model.to(env.device)
    adapters = lora_config(config)
    if adapters is not None:
        apply_lora(model, adapters)
    for block in model.layers:
        if config.activation_checkpointing:
            from torch.distributed._composable import checkpoint as activation_checkpoint

            activation_checkpoint(block)
        if compile_enabled(config, env.device):
            block.compile()
    if env.world_size > 1:
        shard_model(model, env, param_dtype=torch.bfloat16 if bf16 else None)
    return model


def compile_enabled(config: TrainConfig, device: torch.device) -> bool:
    """`config.compile`, defaulting to on for CUDA and off on the CPU (compilation costs minutes there)."""
    return config.compile if config.compile is not None else device.type == "cuda"


def bf16_enabled(config: TrainConfig, device: torch.device) -> bool:
    """`config.bf16`, defaulting to on for CUDA devices with bfloat16 support, off on the CPU."""
    if config.bf16 is not None:
        return config.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (not norms)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )


def cosine_with_warmup(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `max_steps`.

    `step` counts optimizer steps taken so far (the multiplier for the next one).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """`cosine_with_warmup` as a scheduler; its checkpointed state is the step count only,
    so a resumed run may change `max_steps`."""
    schedule = functools.partial(
        cosine_with_warmup, warmup_steps=config.warmup_steps, max_steps=config.max_steps, min_ratio=config.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
