#!/usr/bin/env bash
# Quantized checkpoints side by side on this machine, interleaved round by round: W2 (single stream) on the 4-bit,
# 8-bit asymmetric, FP8 and INT8 SmolLM2-135M checkpoints against pagoda's bf16 and Q4_1 GGUF runs, W1 on W8A8 INT8
# against bf16, vLLM CPU on the same checkpoints where it loads them, and the resident weight bytes. Writes JSON and
# logs to $DATA.
# Usage: docs/plots/quant_side_by_side.sh [STEP...]   (steps: w2 w1 vllm memory; default: all)
# The checkpoints come from tests/fixtures/quant/make_bench_checkpoints.py (into .cache/quant/).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-/tmp/vllm-venv/bin/python}
PAGODA=(${PY} -m pagoda.entrypoints.cli)
HF_DIR=${HF_DIR:-.cache/smollm2-135m-instruct-hf}
Q=${Q:-.cache/quant}
DATA=${DATA:-docs/plots/data/quant-side-by-side}
ROUNDS=${ROUNDS:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
mkdir -p "$DATA"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(w2 w1 vllm memory)
log() { echo "$(date -u +%H:%M:%S) $1 (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$DATA/run.log"; }
W="--input-len 128 --output-len 128"
W2_MODELS=(bf16:$HF_DIR gguf: gptq:$Q/smollm2-gptq-4bit-g32 awq:$Q/smollm2-awq-4bit-g32 fp8:$Q/smollm2-fp8-dynamic
           int8:$Q/smollm2-w8a8-int8 gptq8asym:$Q/smollm2-gptq-8bit-asym-g64)

model_args() { [ -n "$1" ] && echo "--model $1" || true; }  # empty: the bundled Q4_1 GGUF
vllm_latency() {  # MODEL OUT
  "$VLLM_PY" -c "import argparse, sys
from vllm.benchmarks.latency import add_cli_args, main
p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))" \
    --model "$1" --dtype bfloat16 --batch-size 1 $W --num-iters 10 --num-iters-warmup 3 --output-json "$2"
}

for step in "${steps[@]}"; do
  case $step in
    w2) for r in $(seq "$ROUNDS"); do
          for entry in "${W2_MODELS[@]}"; do
            name=${entry%%:*}; model=${entry#*:}
            log "w2 pagoda $name round $r"
            "${PAGODA[@]}" bench latency $(model_args "$model") --dtype bfloat16 $W --batch-size 1 \
              --num-iters-warmup 1 --num-iters 3 --output-json "$DATA/w2-pagoda-$name-round$r.json" 2>>"$DATA/stderr.log"
          done
        done ;;
    w1) for r in $(seq "$ROUNDS"); do
          for entry in "bf16:$HF_DIR" "int8:$Q/smollm2-w8a8-int8" "gptq:$Q/smollm2-gptq-4bit-g32"; do
            name=${entry%%:*}; model=${entry#*:}
            log "w1 pagoda $name round $r"
            "${PAGODA[@]}" bench throughput --model "$model" --dtype bfloat16 --dataset-name random $W \
              --num-prompts 64 --num-iters 3 --output-json "$DATA/w1-pagoda-$name-round$r.json" 2>>"$DATA/stderr.log"
          done
        done ;;
    vllm) for entry in "gptq:$Q/smollm2-gptq-4bit-g32" "awq:$Q/smollm2-awq-4bit-g32" "int8:$Q/smollm2-w8a8-int8" \
                       "fp8:$Q/smollm2-fp8-dynamic"; do
          name=${entry%%:*}; model=${entry#*:}
          log "w2 vllm $name"
          vllm_latency "$model" "$DATA/w2-vllm-$name.json" > "$DATA/w2-vllm-$name.log" 2>&1 \
            || log "w2 vllm $name: did not run (see w2-vllm-$name.log)"
          log "w1 vllm $name"
          "$VLLM_PY" docs/plots/peers/vllm_w1.py --model "$model" --num-iters 3 --output-json "$DATA/w1-vllm-$name.json" \
            > "$DATA/w1-vllm-$name.log" 2>&1 || log "w1 vllm $name: did not run (see w1-vllm-$name.log)"
        done ;;
    memory) log "memory"
          "$PY" docs/plots/quant_memory.py "$Q"/smollm2-* > "$DATA/memory.txt" 2>>"$DATA/stderr.log" ;;
    *) echo "unknown step $step (w2 w1 vllm memory)" >&2; exit 2 ;;
  esac
done
log "done"
