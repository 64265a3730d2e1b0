"""Training: pretraining, supervised fine-tuning, LoRA/QLoRA, on one process or many.

- `config`: `TrainConfig` with Llama 2's recipes as defaults, YAML + flags.
- `data`: corpora and chat dialogs tokenized into memory-mapped token files.
- `packing`: packed or padded rows, batches, a resumable sample order.
- `lora`, `nf4`: LoRA adapters; frozen NF4/int8 bases for QLoRA.
- `trainer`: the training loop, checkpoints, metrics.
- `distributed`: torch.distributed setup and FSDP2 sharding.
- `plot`: loss and learning-rate curves of a run.
"""
