#!/usr/bin/env bash
# Reproduces neoj's built-in model (src/neoj/builtin) with one command, from the repository root:
#
#     bash recipes/builtin/train.sh
#
# It trains recipes/builtin/config.json from random weights with `neoj train` on the Python 3.11
# documentation sources (../shared/data/pydocs-train.jsonl), holding 5% of the documents out for
# validation, then packages the result into src/neoj/builtin with its model card. Interrupted or
# killed, run it again: it resumes from build/builtin-run/checkpoint.pt. On CPU it uses bf16 autocast
# (fp32 master weights), which needs AVX512-BF16 or AMX to be fast; set AUTOCAST=off elsewhere.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA=${DATA:-../shared/data/pydocs-train.jsonl}
RUN=${RUN:-build/builtin-run}
STEPS=${STEPS:-560}
AUTOCAST=${AUTOCAST:-bf16}
THREADS=${THREADS:-2}

neoj train --config recipes/builtin/config.json --data "$DATA" --out "$RUN" \
    --seed 0 --val-fraction 0.05 --seq-len 512 --batch-size 8 --max-steps "$STEPS" \
    --lr 1.5e-3 --warmup-steps 30 --min-lr-ratio 0.1 --weight-decay 0.1 --adam-beta2 0.95 --clip 1.0 \
    --autocast "$AUTOCAST" --save-every 25 --eval-every 100 --eval-blocks 32 --save-dtype float16 \
    --threads "$THREADS" --resume
python recipes/builtin/package.py "$RUN" src/neoj/builtin --data "$DATA" --steps "$STEPS" --autocast "$AUTOCAST"
