#!/usr/bin/env bash
# RLHF on a task that is not healthcare, end to end, on a laptop CPU in about a minute:
# a support assistant that must name the customer's own order code. No reward model: a rule
# reward (order_reward.py) and the task's own checks (order_checks.py) for the safety fuse.
#   bash examples/own_data/run.sh [RUNS_FOLDER]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-runs/own}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny models: one thread is fastest
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # where --reward-fn and --checks live

python "$here/make_data.py" --out "$out/data"
cliprail rlhf sft --data "$out/data/demonstrations.jsonl" --run-dir "$out/sft" \
    --extra-tokens "$out/data/tokens.json" --epochs 10 --learning-rate 4e-3
cliprail rlhf ppo --prompts "$out/data/prompts.jsonl" --sft-model "$out/sft/model" \
    --reward-fn order_reward:order_reward --checks order_checks:order_checks \
    --advantage grpo --group-size 4 --total-episodes 3072 --kl-coef 0.2 --learning-rate 1e-4 \
    --max-new-tokens 24 --eval-prompts 60 --run-dir "$out/ppo"
cliprail rlhf eval --run-dir "$out/ppo" --n-prompts 100
