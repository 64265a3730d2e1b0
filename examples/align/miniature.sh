#!/usr/bin/env bash
# Miniature RLHF on the CPU: the default SmolLM2-135M-Instruct with LoRA, synthetic preferences.
# Usage: examples/align/miniature.sh [RUN_DIR]   (each stage resumes when run again; stage times in RUN/times.txt)
set -euo pipefail
RUN=${1:-runs/align-miniature}
LLAMA2=${LLAMA2:-llama2}
COMMON=(--seq-len 128 --lora-rank 8 --seed 0 --save-every 10)
mkdir -p "$RUN"
stage() {  # stage NAME COMMAND...: run it, append its wall time to RUN/times.txt
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "$name $((SECONDS - start)) s" >>"$RUN/times.txt"
}

# 1. Synthetic data: helpfulness pairs (answer levels 0..3), safety pairs (refusal vs compliance), prompts;
#    the last 6 prompts are held out for the greedy-reward measure.
stage data $LLAMA2 align synthetic "$RUN/data" --pairs 320
head -n 18 "$RUN/data/prompts.jsonl" >"$RUN/data/train_prompts.jsonl"
tail -n 6 "$RUN/data/prompts.jsonl" >"$RUN/data/heldout_prompts.jsonl"

# 2. Reward models (held-out accuracy per rating printed and logged).
stage rm-helpful $LLAMA2 align rm --data "$RUN/data/helpfulness.jsonl" --output-dir "$RUN/rm-helpful" \
    --batch-size 8 --max-steps 16 --lr 3e-4 --export none "${COMMON[@]}"
stage rm-safety $LLAMA2 align rm --data "$RUN/data/safety.jsonl" --output-dir "$RUN/rm-safety" \
    --batch-size 8 --max-steps 4 --lr 3e-4 --export none "${COMMON[@]}"
REWARDS=(--reward-model "$RUN/rm-helpful" --safety-reward-model "$RUN/rm-safety")

# 3. The base model's held-out greedy reward: step 0 of a one-iteration PPO run.
stage base-reward $LLAMA2 align ppo --data "$RUN/data/train_prompts.jsonl" \
    --val-data "$RUN/data/heldout_prompts.jsonl" --output-dir "$RUN/base-reward" "${REWARDS[@]}" \
    --max-gen-len 32 --max-steps 1 --batch-size 4 --eval-every 1 --export none "${COMMON[@]}"

# 4. Rejection sampling: best of 4 answers per prompt by R_c, then SFT on them.
stage rs $LLAMA2 align rejection-sampling --data "$RUN/data/train_prompts.jsonl" --output-dir "$RUN/rs" \
    "${REWARDS[@]}" --samples 4 --max-gen-len 32 --max-steps 8 --batch-size 8 --lr 2e-4 --export meta "${COMMON[@]}"

# 5. PPO from the rejection-sampled policy; val_reward at step 0 is the RS policy's, at the end PPO's.
stage ppo $LLAMA2 align ppo --model "$RUN/rs/final" --data "$RUN/data/train_prompts.jsonl" \
    --val-data "$RUN/data/heldout_prompts.jsonl" --output-dir "$RUN/ppo" "${REWARDS[@]}" \
    --max-gen-len 32 --max-steps 6 --batch-size 8 --eval-every 3 --lr 1e-4 --export meta "${COMMON[@]}"

# 6. The safety report (rule judge) of the base model and the final one.
[ -f "$RUN/safety-base/results.json" ] ||
    stage safety-base $LLAMA2 eval safety --output-dir "$RUN/safety-base" --max-tokens 48 --batch-size 8 --json
stage safety-final $LLAMA2 eval safety --model "$RUN/ppo/final" --output-dir "$RUN/safety-final" \
    --max-tokens 48 --batch-size 8 --json

# 7. Ghost Attention: adherence per turn (1..20) before and after.
stage gatt $LLAMA2 align gatt --output-dir "$RUN/gatt" --dialogs 8 --turns 3 --max-steps 8 --batch-size 4 \
    --adherence-dialogs 4 --lr 2e-4 --export meta --seq-len 512 --lora-rank 8 --seed 0 --save-every 10

# 8. The figures: RUN/summary.json (stage times in RUN/times.txt).
${PYTHON:-python} "$(dirname "$0")/summarize.py" "$RUN"
