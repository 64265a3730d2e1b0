"""The training loop: global batches, gradient accumulation, clipping, schedule, checkpoints, metrics.

One step consumes the global batch of `batch_size` rows: each of the W processes reads
its slice in micro-batches, and the loss is the mean cross-entropy over every target
token of the whole global batch (each micro-batch's summed loss is divided by the
global target count), so the step is the same computation for any W and any
micro-batch size. Running the same command again on the same output folder resumes
from its latest checkpoint; the loss curve then continues exactly as if the run had
never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..chat import resolve_chat_format
from ..errors import Llama2Error
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_folder
from .config import CONFIG_FILE, PAPER_SEQ_LEN, TrainConfig, save_config
from .data import TokenDataset, is_prepared, prepare_data
from .distributed import DistributedEnv, all_reduce_sum, broadcast_object, init_distributed, shutdown
from .metrics import MetricsLog, flops_per_token, peak_flops
from .model_setup import (
    bf16_enabled,
    build_optimizer,
    build_scheduler,
    load_training_model,
    lora_config,
    prepare_model,
)
from .packing import IGNORE_INDEX, Batch, BatchPlan, EpochSampler, Rows, collate, make_rows

StepCallback = Callable[[int, dict], None]


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's targets (labels != IGNORE_INDEX)."""
    logits = model(batch.inputs, batch.positions, document_ids=batch.document_ids)  # [B, T, vocab]
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def resolve_seq_len(config: TrainConfig, max_seq_len: int) -> int:
    """The run's sequence length: as configured, else 4096 capped at the model's context."""
    seq_len = config.seq_len or min(PAPER_SEQ_LEN, max_seq_len)
    if seq_len > max_seq_len:
        raise Llama2Error(f"seq_len {seq_len} exceeds the model's context of {max_seq_len}")
    return seq_len


class Trainer:
    """One training run (pretraining or SFT, full or LoRA) on this process's share of the work.

    Args:
        config: a resolved `TrainConfig`.
        env: the distributed environment (default: a single process on the configured device).
        callbacks: called as callback(step, record) after each step is logged, evaluated
            and checkpointed.
    """

    def __init__(self, config: TrainConfig, env: DistributedEnv | None = None, callbacks: Sequence[StepCallback] = ()):
        self.config = config
        self.env = env or DistributedEnv(device=torch.device(config.device or "cpu"))
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        micro = config.micro_batch_size or min(4, config.batch_size // self.env.world_size or 1)
        self.plan = BatchPlan(config.batch_size, self.env.world_size, self.env.rank, micro)

        torch.manual_seed(config.seed)  # the same initialization on every process
        self.loaded = load_training_model(config, self.env.device)
        self.seq_len = resolve_seq_len(config, self.loaded.args.max_seq_len)
        self.train_rows, self.val_rows = self._load_data()
        self.bf16 = bf16_enabled(config, self.env.device)
        self.lora = lora_config(config)
        self.model = self.prepare_model()
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.sampler = EpochSampler(len(self.train_rows), config.seed)
        self.flops_per_token = flops_per_token(self.loaded.args, self.seq_len, frozen_base=self.lora is not None)
        self.peak_flops = peak_flops(
            self.env.device, torch.bfloat16 if self.bf16 else torch.float32, config.peak_tflops
        )
        self.state = {"step": 0, "samples_seen": 0, "tokens_seen": 0, "elapsed_s": 0.0}
        self._resume()  # last: it sets the random state training continues from
        self.metrics = MetricsLog(self.output_dir, self.state["step"]) if self.env.is_main else None
        if self.env.is_main:
            save_config(config, self.output_dir / CONFIG_FILE)

    # ------------------------------------------------------------------ setup

    def _load_data(self) -> tuple[Rows, Rows | None]:
        """Prepare (on rank 0) or open the training and validation data; build their rows."""
        chat_format = None
        if self.config.mode == "sft":
            chat_format = resolve_chat_format(self.loaded.tokenizer, self.loaded.chat_template, self.config.chat_format)
        datasets = {}
        for split, paths in (("train", self.config.data), ("val", self.config.val_data)):
            if not paths:
                continue
            folder = Path(paths[0]) if is_prepared(paths) else self.output_dir / "data" / split
            error = None
            if self.env.is_main and not is_prepared(paths):
                try:
                    prepare_data(paths, folder, self.loaded.tokenizer, chat_format)
                except Llama2Error as caught:
                    error = str(caught)
            error = broadcast_object(error, self.env)  # the other processes wait here for rank 0
            if error:
                raise Llama2Error(error)
            datasets[split] = TokenDataset(folder)
        rows = {split: self._rows(dataset) for split, dataset in datasets.items()}
        for split, split_rows in rows.items():
            if len(split_rows) == 0:
                raise Llama2Error(f"the {split} data gives no {self.seq_len}-token rows: add data or lower --seq-len")
        return rows["train"], rows.get("val")

    def _rows(self, dataset: TokenDataset) -> Rows:
        split_documents = self.config.mode == "pretrain"
        return make_rows(dataset, self.seq_len, self.config.layout, split_documents, self.config.document_mask)

    def prepare_model(self) -> nn.Module:
        """The module to train, ready for its device (a hook: alignment stages wrap the model)."""
        return prepare_model(self.loaded.model, self.config, self.env, self.bf16)

    def compute_loss(self, batch) -> torch.Tensor:
        """The summed loss of one micro-batch (a hook: alignment stages train other objectives)."""
        return causal_lm_loss(self.model, batch)

    def _resume(self) -> None:
        """Continue from the latest checkpoint, or seed this process's training randomness."""
        folder = latest_checkpoint(self.output_dir)
        if folder is None:
            torch.manual_seed(self.config.seed + 1 + self.env.rank)  # dropout differs across processes
            return
        saved = load_checkpoint(folder, self.model, self.optimizer, self.scheduler, self.env, self.lora is not None)
        self.state.update({k: saved[k] for k in self.state if k in saved})
        if self.env.is_main:
            print(f"resuming from {folder} (step {self.state['step']})")

    # ------------------------------------------------------------------ steps

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16)

    def _batch(self, samples: range) -> Batch:
        return collate([self.train_rows[self.sampler.row(k)] for k in samples])

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of `step`; returns its metrics."""
        start = time.perf_counter()
        batches = [self._batch(samples) for samples in self.plan.micro_batches(self.state["samples_seen"])]
        local_tokens = sum(b.num_tokens for b in batches)
        local_targets = sum(b.num_targets for b in batches)
        tokens, targets = all_reduce_sum([local_tokens, local_targets], self.env)
        # Each process's gradients are averaged over processes by FSDP, hence the world size.
        scale = self.env.world_size / max(targets, 1)
        loss_sum = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(batches):
            self._sync_gradients(last=i == len(batches) - 1)
            with self._autocast():
                loss = self.compute_loss(batch.to(self.env.device))
            (loss * scale).backward()
            loss_sum += loss.detach()
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total_loss,) = all_reduce_sum([loss_sum.item()], self.env)
        seconds = time.perf_counter() - start
        self.state["step"] = step + 1
        self.state["samples_seen"] += self.config.batch_size
        self.state["tokens_seen"] += int(tokens)
        self.state["elapsed_s"] += seconds
        tokens_per_s = tokens / seconds
        return {
            "step": step + 1,
            "loss": total_loss / max(targets, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.env.world_size),
            "tokens": self.state["tokens_seen"],
            "step_time_s": seconds,
            "elapsed_s": self.state["elapsed_s"],
        }

    def _sync_gradients(self, last: bool) -> None:
        """With FSDP, reduce gradients only after the last micro-batch of a step."""
        if self.env.world_size > 1 and self.plan.accumulation_steps > 1:
            self.model.set_requires_gradient_sync(last)

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss and perplexity over the validation rows (a collective)."""
        rows, env, micro = self.val_rows, self.env, self.plan.micro_batch
        rounds = math.ceil(len(rows) / (env.world_size * micro))
        if self.config.eval_batches:
            rounds = min(rounds, self.config.eval_batches)
        self.model.eval()
        loss_sum, targets = 0.0, 0
        for r in range(rounds):
            first = (r * env.world_size + env.rank) * micro
            indices = [i for i in range(first, first + micro) if i < len(rows)]
            # Every process runs the same number of forward passes (FSDP gathers weights in them).
            batch = collate([rows[i] for i in indices or [0]]).to(env.device)
            with self._autocast():
                loss = self.compute_loss(batch)
            if indices:
                loss_sum, targets = loss_sum + loss.item(), targets + batch.num_targets
        self.model.train()
        loss_sum, targets = all_reduce_sum([loss_sum, targets], env)
        loss = loss_sum / max(targets, 1)
        return {"step": self.state["step"], "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ the run

    def _log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _save(self) -> None:
        folder = step_folder(self.output_dir, self.state["step"])
        save_checkpoint(
            folder,
            self.model,
            self.optimizer,
            self.scheduler,
            dict(self.state),
            self.env,
            trainable_only=self.lora is not None,
            keep=self.config.keep_checkpoints,
        )

    def _due(self, every: int, step: int) -> bool:
        return step == self.config.max_steps or (every > 0 and step % every == 0)

    def train(self) -> dict:
        """Run from the current step to `max_steps`, then export; returns the last metrics."""
        from tqdm import tqdm

        config, last = self.config, {}
        if self.val_rows is not None and self.state["step"] == 0:
            self._log(last := self.evaluate())
        bar = tqdm(
            total=config.max_steps,
            initial=self.state["step"],
            desc=config.mode,
            unit="step",
            disable=not self.env.is_main,
        )
        with bar:
            for step in range(self.state["step"], config.max_steps):
                record = self.train_step(step)
                if record["step"] % config.log_every == 0 or record["step"] == config.max_steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                last = record
                if self.val_rows is not None and self._due(config.eval_every, record["step"]):
                    self._log(evaluation := self.evaluate())
                    last = {**last, **evaluation}
                if self._due(config.save_every, record["step"]):
                    self._save()
                for callback in self.callbacks:
                    callback(record["step"], record)
        self.export()
        if self.metrics is not None:
            self.metrics.close()
        return last

    def export(self) -> Path | None:
        """Write the final model (merged adapters, and the adapters alone) to OUTPUT_DIR/final."""
        from .export import export_model

        return export_model(self.model, self.loaded, self.lora, self.config, self.env, self.output_dir / "final")


def run_training(config: TrainConfig, callbacks: Sequence[StepCallback] = ()) -> dict:
    """Train with `config` (resolved) on this process, joining torchrun's process group if any.

    Returns:
        The last step's metrics (with the last validation, when there is validation data).
    """
    env = init_distributed(config.device)
    try:
        return Trainer(config, env, callbacks).train()
    finally:
        shutdown(env)
