#!/usr/bin/env bash
# Re-run the figures of docs/benchmarks.md: W1, W2, W3, the engine-overhead profile and the concurrency plot.
# Usage: docs/plots/run_benchmarks.sh [STEP...]   (steps: w1 w2 hf w3 overhead sweep sweep-gguf plot;
# default: all)
# HF_DIR is the HF-format SmolLM2-135M-Instruct copy (tests/conftest.py's smollm2_hf_dir builds it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PAGODA=(${PY} -m pagoda.entrypoints.cli)
HF_DIR=${HF_DIR:-.cache/smollm2-135m-instruct-hf}
DATA=${DATA:-docs/plots/data/pagoda}
RUNS=${RUNS:-3}
mkdir -p "$DATA"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(w1 w2 hf w3 overhead sweep sweep-gguf plot)
# name: label → engine flags (GGUF = the bundled default model, no --model)
declare -A MODEL=([bf16]="--model $HF_DIR --dtype bfloat16" [gguf]="")
W1="--dataset-name random --input-len 128 --output-len 128 --num-prompts 64"
load() { echo "load average before $1: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$DATA/load.txt"; }

for step in "${steps[@]}"; do
  case $step in
    w1) for m in bf16 gguf; do load "w1-$m"
          "${PAGODA[@]}" bench throughput ${MODEL[$m]} $W1 --num-iters "$RUNS" --output-json "$DATA/w1-$m.json"; done ;;
    w2) for m in bf16 gguf; do load "w2-$m"
          "${PAGODA[@]}" bench latency ${MODEL[$m]} --input-len 128 --output-len 128 --batch-size 1 \
            --num-iters-warmup 1 --num-iters "$RUNS" --output-json "$DATA/w2-$m.json"; done ;;
    hf) load "w2-transformers"
        $PY -m pagoda.benchmarks.hf_generate --model "$HF_DIR" --dtype bfloat16 --batch-size 1 --input-len 128 \
          --output-len 128 --num-iters "$RUNS" --output-json "$DATA/w2-transformers-bf16.json" ;;
    w3) port=${PORT:-8731}; load "w3"
        "${PAGODA[@]}" serve $HF_DIR --dtype bfloat16 --host 127.0.0.1 --port "$port" --disable-log-requests \
          --disable-log-stats > "$DATA/w3-server.log" 2>&1 &
        server=$!
        trap 'kill $server 2>/dev/null || true' EXIT
        for _ in $(seq 300); do curl -sf "127.0.0.1:$port/health" >/dev/null && break; sleep 1; done
        "${PAGODA[@]}" bench serve --port "$port" --dataset-name random --random-input-len 128 \
          --random-output-len 128 --num-prompts 64 --max-concurrency 64 --ignore-eos --output-json "$DATA/w3-bf16.json"
        kill "$server"; wait "$server" || true; trap - EXIT ;;
    overhead) for m in bf16 gguf; do load "overhead-$m"
          "${PAGODA[@]}" bench step-overhead ${MODEL[$m]} --num-requests 64 --input-len 128 --num-steps 64 \
            --output-json "$DATA/overhead-$m.json"; done ;;
    sweep) load "sweep-bf16"
           $PY -m pagoda.benchmarks.plot run --label "pagoda, bf16 safetensors" --json "$DATA/sweep-bf16.json" \
             --concurrency 1 4 16 64 ${MODEL[bf16]} ;;
    sweep-gguf) load "sweep-gguf"
           $PY -m pagoda.benchmarks.plot run --label "pagoda, Q4_1 GGUF" --json "$DATA/sweep-gguf.json" \
             --concurrency 1 4 16 64 ;;
    plot) $PY -m pagoda.benchmarks.plot draw "$DATA"/sweep-*.json --out docs/plots/throughput_vs_concurrency.png \
            --title "${PLOT_TITLE:-pagoda, SmolLM2-135M: 128-token prompts, 128 output tokens}" ;;
    *) echo "unknown step $step (w1 w2 hf w3 overhead sweep sweep-gguf plot)" >&2; exit 2 ;;
  esac
done
