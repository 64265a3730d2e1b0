"""Export a trained model through the weights writers: Meta, Hugging Face or GGUF.

The (possibly FSDP-sharded) model is gathered into a full state dict on rank 0, loaded
into an unsharded replica built on the meta device, LoRA adapters are saved on their own
and merged, and the canonical state dict goes to the chosen writer with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..model import meta_transformer
from .config import TrainConfig
from .distributed import DistributedEnv, barrier
from .lora import LoRAConfig, apply_lora, merge_lora, save_adapters
from .model_setup import TrainingModel

ADAPTER_FOLDER = "adapter"


def _write_meta(args, state_dict, path, tokenizer, chat_template):
    from ..weights.meta import write_meta

    return write_meta(args, state_dict, path, tokenizer=tokenizer, chat_template=chat_template)


def _write_hf(args, state_dict, path, tokenizer, chat_template):
    from ..weights.hf import write_hf

    return write_hf(args, state_dict, path, tokenizer=tokenizer, chat_template=chat_template)


def _write_gguf(args, state_dict, path, tokenizer, chat_template):
    from ..weights.gguf_writer import write_gguf

    return write_gguf(args, state_dict, path.with_suffix(".gguf"), tokenizer=tokenizer, chat_template=chat_template)


WRITERS = {"meta": _write_meta, "hf": _write_hf, "gguf": _write_gguf}


def gather_replica(model: nn.Module, args, lora: LoRAConfig | None, env: DistributedEnv) -> nn.Module | None:
    """An unsharded CPU copy of a trained model (with its adapters), on rank 0; None elsewhere.

    A collective under FSDP: every process must call it.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    return replica_from_state_dict(full, args, lora)


def replica_from_state_dict(state_dict: dict[str, torch.Tensor], args, lora: LoRAConfig | None) -> nn.Module:
    """A `Transformer` (with adapters when `lora` is given) holding a full state dict's tensors."""
    replica = meta_transformer(args, None if lora is None else lambda model: apply_lora(model, lora))
    replica.load_state_dict(state_dict, strict=True, assign=True)
    return replica


def write_replica(
    replica: nn.Module, loaded: TrainingModel, lora: LoRAConfig | None, config: TrainConfig, folder: Path
):
    """Save LoRA adapters to OUTPUT_DIR/adapter, merge them, and write the model to `folder` in `config.export`.

    Returns:
        The written model path (None when `config.export` is "none").
    """
    if lora is not None:
        save_adapters(replica, lora, folder.parent / ADAPTER_FOLDER, base_model=loaded.source)
        merge_lora(replica)
    if config.export == "none":
        return None
    state_dict = {name: t.detach().float().contiguous() for name, t in replica.state_dict().items()}
    return WRITERS[config.export](loaded.args, state_dict, folder, loaded.tokenizer, loaded.chat_template)


def export_model(
    model: nn.Module,
    loaded: TrainingModel,
    lora: LoRAConfig | None,
    config: TrainConfig,
    env: DistributedEnv,
    folder: Path,
) -> Path | None:
    """Write the final model to `folder` (adapters merged) and LoRA adapters alone to OUTPUT_DIR/adapter.

    Returns:
        The written model path on rank 0 (None elsewhere, or when `config.export` is "none").
    """
    if config.export == "none" and lora is None:
        return None
    replica = gather_replica(model, loaded.args, lora, env)
    written = write_replica(replica, loaded, lora, config, folder) if replica is not None else None
    barrier(env)
    return written
