"""torch.distributed for training: process group from torchrun's environment, FSDP2 sharding.

One process needs nothing: the model stays a plain module. Under `torchrun
--nproc-per-node N` each process joins a process group (NCCL on CUDA, gloo on CPU) and
the model is sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): every
`TransformerBlock` is its own unit, then the root (embeddings, final norm, head), so a
block's parameters are gathered only while it runs. Parameters and gradients are
DTensors sharded over a 1-D device mesh; gradients are reduce-scattered (averaged over
processes) in the backward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import Llama2Error


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the run.

    Attributes:
        rank: global rank (0 for a single process).
        world_size: number of processes.
        device: the device this process trains on.
        mesh: the 1-D device mesh FSDP shards over (None for a single process).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """The requested device, else this process's GPU (torchrun's LOCAL_RANK), else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Llama2Error(f"device {requested} requested but CUDA is not available")
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(requested_device: str | None = None) -> DistributedEnv:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size == 1:
        return DistributedEnv(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (world_size,))
    return DistributedEnv(rank=dist.get_rank(), world_size=world_size, device=device, mesh=mesh)


def shutdown(env: DistributedEnv) -> None:
    """Leave the process group, if this process joined one."""
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module, env: DistributedEnv, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2-shard each transformer block, then the root, over `env.mesh` (in place).

    Args:
        model: a `Transformer` (anything with a `layers` list of blocks).
        env: the distributed environment (several processes).
        param_dtype: dtype parameters are gathered in for compute (bf16 mixed precision);
            gradients are reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=env.mesh, mp_policy=policy)
    fully_shard(model, mesh=env.mesh, mp_policy=policy)
    return model


def all_reduce_sum(values: list[float], env: DistributedEnv) -> list[float]:
    """Element-wise sum of `values` over all processes (float64)."""
    if env.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(env: DistributedEnv) -> None:
    """Wait for every process (no-op for one)."""
    if env.world_size > 1:
        dist.barrier()


def broadcast_object(value, env: DistributedEnv):
    """Rank 0's `value`, on every process."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
