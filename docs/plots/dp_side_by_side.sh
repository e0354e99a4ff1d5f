#!/usr/bin/env bash
# Data parallelism against one engine on the same cores, interleaved round by round (the host's speed drifts by
# several percent within minutes): W1 (offline throughput, `pagoda bench throughput`) and W3 (serving,
# `pagoda bench serve` against `pagoda serve`), each as
#   one   — one engine with THREADS threads, and
#   dp2   — `-dp 2`, two replicas with THREADS/2 threads each (PAGODA_CPU_THREADS is per replica).
# Writes JSON and logs to $DATA. Take figures on a quiet machine only.
# Usage: docs/plots/dp_side_by_side.sh [STEP...]   (steps: w1 w3; default: both)
# Settings (environment): MODEL (a model directory; default: the bundled model), DTYPE (default: the model's),
# THREADS (default 2), ROUNDS (2), NUM_PROMPTS (64), INPUT_LEN / OUTPUT_LEN (128), NUM_ITERS (3), PORT (8741).
# A quick check that it runs: NUM_PROMPTS=4 INPUT_LEN=16 OUTPUT_LEN=8 NUM_ITERS=1 ROUNDS=1 docs/plots/dp_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PAGODA=(${PY} -m pagoda.entrypoints.cli)
DATA=${DATA:-docs/plots/data/dp-side-by-side}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
NUM_PROMPTS=${NUM_PROMPTS:-64}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
NUM_ITERS=${NUM_ITERS:-3}
PORT=${PORT:-8741}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS+=(--model "$MODEL")
[ -n "${DTYPE:-}" ] && MODEL_ARGS+=(--dtype "$DTYPE")
HALF=$(( THREADS / 2 > 0 ? THREADS / 2 : 1 ))
mkdir -p "$DATA"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(w1 w3)
log() { echo "$(date -u +%H:%M:%S) $1 (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$DATA/run.log"; }

# NAME: "one" or "dp2" → the thread count and the engine flags of that side
threads_of() { [ "$1" = one ] && echo "$THREADS" || echo "$HALF"; }
flags_of() { [ "$1" = one ] && echo "-dp 1" || echo "-dp 2"; }

w1_run() {  # NAME ROUND
  log "w1 $1 round $2"
  PAGODA_CPU_THREADS=$(threads_of "$1") "${PAGODA[@]}" bench throughput "${MODEL_ARGS[@]}" $(flags_of "$1") \
    --dataset-name random --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS" \
    --num-iters "$NUM_ITERS" --output-json "$DATA/w1-$1-round$2.json" 2>>"$DATA/stderr.log"
}

wait_health() {  # PORT PID: 0 once healthy, 1 if the server exited or never came up
  for _ in $(seq 900); do
    curl -sf "127.0.0.1:$1/health" >/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 1
  done
  return 1
}

w3_run() {  # NAME ROUND: start the server, load it with pagoda's client, stop it
  log "w3 $1 round $2"
  PAGODA_CPU_THREADS=$(threads_of "$1") "${PAGODA[@]}" serve "${MODEL_ARGS[@]}" $(flags_of "$1") \
    --host 127.0.0.1 --port "$PORT" --disable-log-requests > "$DATA/w3-$1-server-round$2.log" 2>&1 &
  local server=$!
  if wait_health "$PORT" "$server"; then
    "${PAGODA[@]}" bench serve --port "$PORT" --dataset-name random --random-input-len "$INPUT_LEN" \
      --random-output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS" --max-concurrency "$NUM_PROMPTS" \
      --ignore-eos --disable-tqdm --output-json "$DATA/w3-$1-round$2.json" >> "$DATA/w3-client.log" 2>&1
  else
    echo "the $1 server did not start; see $DATA/w3-$1-server-round$2.log" >&2
    kill "$server" 2>/dev/null || true
    wait "$server" || true
    exit 1
  fi
  kill "$server"
  wait "$server" || true
}

for step in "${steps[@]}"; do
  case $step in
    w1) for r in $(seq "$ROUNDS"); do w1_run one "$r"; w1_run dp2 "$r"; done ;;
    w3) for r in $(seq "$ROUNDS"); do w3_run one "$r"; w3_run dp2 "$r"; done ;;
    *) echo "unknown step $step (w1 w3)" >&2; exit 2 ;;
  esac
done
"$PY" - "$DATA" <<'PYEOF'
import json, pathlib, statistics, sys
data = pathlib.Path(sys.argv[1])
for workload, key in (("w1", "output_tokens_per_second"), ("w3", "output_throughput")):
    for name in ("one", "dp2"):
        values = [json.loads(p.read_text()).get(key) for p in sorted(data.glob(f"{workload}-{name}-round*.json"))]
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            print(f"{workload} {name}: median {statistics.median(values):.1f} output tokens/s over {len(values)} "
                  f"round(s): {', '.join(f'{v:.1f}' for v in values)}")
PYEOF
log "done"
