"""Training checkpoints: model, optimizer, scheduler, data position and RNG, written atomically.

A checkpoint is a folder OUTPUT_DIR/checkpoints/step_NNNNNNNN:

    .metadata, __*.distcp   model and optimizer state (torch.distributed.checkpoint:
                            each process writes its own shards of FSDP's DTensors)
    scheduler.pt            the learning-rate scheduler's state
    rng_R.pt                process R's torch (and CUDA) random state
    state.json              step, samples and tokens seen, world size

Everything is written into `step_NNNNNNNN.tmp` and renamed into place once complete,
so a run killed at any moment leaves either the whole checkpoint or none of it. LoRA
runs save only the trainable parameters (the frozen base is reloaded from the model).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import Llama2Error
from .data import write_json_atomic
from .distributed import DistributedEnv, barrier

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
SCHEDULER_FILE = "scheduler.pt"
_STEP_DIR = re.compile(r"step_(\d{8})")


def step_folder(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step_{step:08d}"


def completed_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoint folders of a run, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = completed_checkpoints(output_dir)
    return found[-1] if found else None


def _options(trainable_only: bool, strict: bool = True) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=strict and not trainable_only)


@contextlib.contextmanager
def _single_process_quietly():
    """Silence DCP's notice that it runs without a process group (intended for one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: dict,
    env: DistributedEnv,
    trainable_only: bool = False,
    keep: int = 2,
) -> None:
    """Write a checkpoint folder atomically (a collective: every process calls it).

    Args:
        folder: the final folder (`step_folder(...)`).
        model, optimizer, scheduler: what to save.
        state: JSON-able training position (step, samples seen, ...).
        env: the distributed environment.
        trainable_only: save only parameters that require gradients (LoRA).
        keep: how many newest checkpoints to keep; older ones are deleted.
    """
    temp = folder.with_name(folder.name + ".tmp")
    if env.is_main:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    barrier(env)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    with _single_process_quietly():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temp, no_dist=env.world_size == 1)
    torch.save(_rng_state(env.device), temp / f"rng_{env.rank}.pt")
    barrier(env)
    if env.is_main:
        torch.save(scheduler.state_dict(), temp / SCHEDULER_FILE)
        write_json_atomic(temp / STATE_FILE, {**state, "world_size": env.world_size})
        _fsync_tree(temp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp, folder)
        for old in completed_checkpoints(folder.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself to disk before it is renamed into place."""
    for path in folder.iterdir():
        with path.open("rb") as file:
            os.fsync(file.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    env: DistributedEnv,
    trainable_only: bool = False,
) -> dict:
    """Restore a checkpoint written by `save_checkpoint` (a collective) and return its state.

    The random state is restored only when the number of processes is unchanged.

    Raises:
        Llama2Error: the folder is unreadable or does not fit the model.
    """
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(trainable_only))
        saved = {"model": model_state, "optimizer": optimizer_state}
        with _single_process_quietly():
            dcp.load(saved, checkpoint_id=folder, no_dist=env.world_size == 1)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=saved["model"],
            optim_state_dict=saved["optimizer"],
            options=_options(trainable_only),
        )
        scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=True))
    except (OSError, RuntimeError, KeyError, ValueError, CheckpointException) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Llama2Error(f"{folder}: cannot resume from this checkpoint ({first_line})") from error
    rng_path = folder / f"rng_{env.rank}.pt"
    if state.get("world_size") == env.world_size and rng_path.is_file():
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], env.device)
    return state
