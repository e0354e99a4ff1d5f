#!/usr/bin/env bash
# Multi-LoRA against the same engine without adapters, interleaved round by round (the host's speed drifts by
# several percent within minutes): W1 (`pagoda bench throughput`) as
#   base   — no adapters,
#   lora   — the requests spread over NUM_LORAS random rank-LORA_RANK adapters, the platform's lora_shrink_expand,
#   torch  — the same with the torch_all_slots implementation (steps with adapter rows run layer by layer).
# Writes JSON and logs to $DATA. Take figures on a quiet machine only.
# Usage: docs/plots/lora_side_by_side.sh
# Settings (environment): MODEL (default: the bf16 SmolLM2 copy in .cache), DTYPE (bfloat16), ROUNDS (3),
# NUM_PROMPTS (64), INPUT_LEN / OUTPUT_LEN (128), NUM_ITERS (3), NUM_LORAS (8), LORA_RANK (16).
# A quick check that it runs: NUM_PROMPTS=4 INPUT_LEN=16 OUTPUT_LEN=8 NUM_ITERS=1 ROUNDS=1 docs/plots/lora_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PAGODA=(${PY} -m pagoda.entrypoints.cli)
DATA=${DATA:-docs/plots/data/lora-side-by-side}
MODEL=${MODEL:-.cache/smollm2-135m-instruct-hf}
DTYPE=${DTYPE:-bfloat16}
ROUNDS=${ROUNDS:-3}
NUM_LORAS=${NUM_LORAS:-8}
LORA_RANK=${LORA_RANK:-16}
mkdir -p "$DATA"
common=(bench throughput --model "$MODEL" --dtype "$DTYPE" --dataset-name random --input-len "${INPUT_LEN:-128}"
        --output-len "${OUTPUT_LEN:-128}" --num-prompts "${NUM_PROMPTS:-64}" --num-iters "${NUM_ITERS:-3}")
lora=(--num-loras "$NUM_LORAS" --lora-rank "$LORA_RANK" --max-loras "$NUM_LORAS")
for round in $(seq 1 "$ROUNDS"); do
  "${PAGODA[@]}" "${common[@]}" --output-json "$DATA/base-r$round.json" > "$DATA/base-r$round.log" 2>&1
  "${PAGODA[@]}" "${common[@]}" "${lora[@]}" --output-json "$DATA/lora-r$round.json" > "$DATA/lora-r$round.log" 2>&1
  "${PAGODA[@]}" "${common[@]}" "${lora[@]}" --op-impl lora_shrink_expand=torch_all_slots \
    --output-json "$DATA/torch-r$round.json" > "$DATA/torch-r$round.log" 2>&1
  grep -H "^Throughput" "$DATA"/*-r"$round".log
done
