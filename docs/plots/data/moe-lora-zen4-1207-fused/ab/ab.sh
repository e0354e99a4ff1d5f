#!/usr/bin/env bash
# Made on 2026-12-07 (AMD EPYC Zen 4): "base" was a `git archive 721f50e pagoda` tree, "new" the checkout at bea640d;
# the adapter and config as docs/plots/moe_lora_side_by_side.sh makes them, in /tmp/s42/moe.
# A/B: base (HEAD before the change) vs new, expert LoRA on Mixtral-small, W1 (64) and W2 (1)
set -u
OUT=/tmp/s42/moe/ab; mkdir -p $OUT
for round in 1 2; do
  for v in base new; do
    dir=/tmp/s42/base; [ $v = new ] && dir=/work/main
    for wl in w1:64 w2:1; do
      name=${wl%%:*}
      (cd $dir && /work/main/.venv/bin/python -m pagoda.entrypoints.cli bench throughput --model /tmp/s42/moe/mixtral-small \
        --load-format dummy --dtype bfloat16 --dataset-name random --input-len 128 --output-len 128 \
        --num-prompts ${wl#*:} --num-iters 1 --lora-path /tmp/s42/moe/experts --max-loras 1 --max-lora-rank 16 \
        --output-json $OUT/$name-$v-r$round.json > $OUT/$name-$v-r$round.log 2>&1)
      echo "$round $v $name $(grep -o '"output_throughput": [0-9.]*' $OUT/$name-$v-r$round.json)"
    done
  done
done
