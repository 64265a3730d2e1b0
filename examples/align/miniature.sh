#!/usr/bin/env bash
# Miniature RLHF on the CPU: the default SmolLM2-135M-Instruct with LoRA, synthetic preferences.
# Usage: examples/align/miniature.sh [RUN_DIR]   (each stage resumes when run again)
set -euo pipefail
RUN=${1:-runs/align-miniature}
COMMON=(--seq-len 128 --lora-rank 8 --seed 0 --save-every 10)
mkdir -p "$RUN"

# 1. Synthetic data: helpfulness pairs (answer levels 0..3), safety pairs (refusal vs compliance), prompts.
llama2 align synthetic "$RUN/data" --pairs 240

# 2. Reward models (held-out accuracy per rating printed and logged).
llama2 align rm --data "$RUN/data/helpfulness.jsonl" --output-dir "$RUN/rm-helpful" \
    --batch-size 8 --epochs 1 --lr 3e-4 --export none "${COMMON[@]}"
llama2 align rm --data "$RUN/data/safety.jsonl" --output-dir "$RUN/rm-safety" \
    --batch-size 8 --epochs 1 --lr 3e-4 --export none "${COMMON[@]}"

# 3. Rejection sampling: best of 4 answers per prompt by R_c, then SFT on them.
llama2 align rejection-sampling --data "$RUN/data/prompts.jsonl" --output-dir "$RUN/rs" \
    --reward-model "$RUN/rm-helpful" --safety-reward-model "$RUN/rm-safety" \
    --samples 4 --max-gen-len 32 --max-steps 8 --batch-size 8 --lr 2e-4 --export meta "${COMMON[@]}"

# 4. PPO from the rejection-sampled policy, held-out greedy reward as val_reward.
llama2 align ppo --model "$RUN/rs/final" --data "$RUN/data/prompts.jsonl" --val-data "$RUN/data/prompts.jsonl" \
    --output-dir "$RUN/ppo" --reward-model "$RUN/rm-helpful" --safety-reward-model "$RUN/rm-safety" \
    --max-gen-len 32 --max-steps 10 --batch-size 8 --eval-every 5 --lr 1e-4 --export none "${COMMON[@]}"
