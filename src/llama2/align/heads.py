"""Scalar heads on the policy architecture (reward, value) and the plumbing they share:
one forward for logits and hidden states, and exporting the backbone apart from the head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .batching import PaddedBatch

HEAD_INIT_STD = 0.02


def forward_with_hidden(model: nn.Module, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits [B, T, V] and final normalized hidden states [B, T, dim] in one forward.

    The hidden states are caught by a hook on the final norm, so a sharded (FSDP) model
    runs its own forward unchanged.
    """
    captured: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        logits = model(batch.tokens, batch.positions, document_ids=batch.document_ids)
    finally:
        handle.remove()
    return logits, captured[0]


class ScalarHead(nn.Linear):
    """dim -> 1 (float32), initialized normal(0, 0.02) with a zero bias."""

    def __init__(self, dim: int, device: torch.device | None = None):
        super().__init__(dim, 1, device=device)
        nn.init.normal_(self.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.float()).squeeze(-1)  # [..., dim] -> [...]


def shard_wrapper(model: nn.Module, env) -> nn.Module:
    """Under FSDP, shard a wrapper whose backbone is sharded already (this manages the head)."""
    if env.world_size > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=env.mesh)
    return model


def export_backbone(trainer, folder: Path) -> tuple[Path | None, dict[str, torch.Tensor]]:
    """Export a trainer's `backbone` as a plain model (adapters saved, then merged) to `folder`.

    A collective. Returns (the written model path, the wrapper's other tensors by name
    without their module prefix, e.g. {"head.weight": ...}); both empty off rank 0.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from ..train.distributed import barrier
    from ..train.export import replica_from_state_dict, write_replica

    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    written, rest = None, {}
    if trainer.env.is_main:
        backbone = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in full.items() if not k.startswith("backbone.")}
        replica = replica_from_state_dict(backbone, trainer.loaded.args, trainer.lora)
        written = write_replica(replica, trainer.loaded, trainer.lora, trainer.config, folder)
    barrier(trainer.env)
    return written, rest
