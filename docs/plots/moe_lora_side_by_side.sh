#!/usr/bin/env bash
# LoRA on a mixture-of-experts model's routed experts against the same engine without adapters and with an
# adapter on the attention only, interleaved round by round: W1 (64 requests) and W2 (one request), 128 -> 128
# tokens, `pagoda bench throughput` on the Mixtral-small family config with dummy weights. The two rank-16 adapters
# are made with peft on that config (attention: q/k/v/o_proj; experts: the same plus target_parameters
# gate_up_proj / down_proj). Writes JSON and logs to $DATA. Take figures on a quiet machine only.
# Usage: docs/plots/moe_lora_side_by_side.sh   (settings: DATA, ROUNDS (2), NUM_ITERS (1))
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-docs/plots/data/moe-lora-side-by-side}
ROUNDS=${ROUNDS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DATA"
"$PY" docs/plots/family_configs.py "$WORK" > /dev/null
MODEL=$WORK/mixtral-small
"$PY" - "$MODEL" "$WORK" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from tests.lora.conftest import make_peft_adapter
model, work = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
attention = ("q_proj", "k_proj", "v_proj", "o_proj")
make_peft_adapter(base, f"{work}/attention", 1, r=16, alpha=32, target_modules=attention, std=0.01)
make_peft_adapter(base, f"{work}/experts", 2, r=16, alpha=32, target_modules=attention,
                  target_parameters=["gate_up_proj", "down_proj"], std=0.01)
PY
for round in $(seq 1 "$ROUNDS"); do
  for variant in none attention experts; do
    extra=()
    [ "$variant" != none ] && extra=(--lora-path "$WORK/$variant" --max-loras 1 --max-lora-rank 16)
    for workload in w1:64 w2:1; do
      name=${workload%%:*}
      "$PY" -m pagoda.entrypoints.cli bench throughput --model "$MODEL" --load-format dummy --dtype bfloat16 \
        --dataset-name random --input-len 128 --output-len 128 --num-prompts "${workload#*:}" \
        --num-iters "${NUM_ITERS:-1}" "${extra[@]}" --output-json "$DATA/$name-$variant-r$round.json" \
        > "$DATA/$name-$variant-r$round.log" 2>&1
    done
  done
done
