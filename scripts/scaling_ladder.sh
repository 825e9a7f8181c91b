#!/usr/bin/env bash
# A scaling ladder on the bundled corpus, then the scaling-law report (docs/scaling.md).
#   scripts/scaling_ladder.sh [OUT_DIR] [extra Hydra overrides...]      (what `make scaling` runs)
# OUT_DIR (default runs/scaling) receives FAMILY/<rung>/ (one run directory per rung) and report/ (dense) or
# report_FAMILY/ (report.md, report.json, scaling.png, the W&B run). Environment:
#   FAMILY      dense (default), moe or hybrid: conf/experiment/scaling_FAMILY.yaml
#   PYTHON      interpreter (default .venv/bin/python)
#   THREADS     OMP threads per run (default 2: the runs go one after another on a 2-core machine)
#   FRESH=0     keep finished rungs (they resume from their checkpoints) instead of starting over
#   BUDGET      FLOP budget for the compute-optimal N and D in the report (default 1e14)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/scaling}
shift || true
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-2}
BUDGET=${BUDGET:-1e14}
FAMILY=${FAMILY:-dense}
REPORT=$OUT/report
[[ "$FAMILY" == dense ]] || REPORT=$OUT/report_$FAMILY

if [[ "${FRESH:-1}" == 1 ]]; then
  rm -rf "${OUT:?}/$FAMILY" "$REPORT"
fi
echo "load average before the ladder: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
start=$(date +%s)
OMP_NUM_THREADS=$THREADS WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true \
  "$PYTHON" -m train --multirun +experiment=scaling_$FAMILY hydra.sweep.dir="$OUT/$FAMILY" "$@"
trained=$(date +%s)
echo "ladder trained in $((trained - start)) s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "CPU time (user, system) of this script and of the runs:"; times
# N = non-embedding parameters: with an 8000-piece vocabulary the input table would dominate tiny models.
OMP_NUM_THREADS=$THREADS WANDB_MODE=${WANDB_MODE:-offline} \
  "$PYTHON" -m train.scaling report "$OUT/$FAMILY" --out "$REPORT" --params nonembedding \
  --holdout-largest --budget "$BUDGET" --wandb
echo "ladder + report in $(($(date +%s) - start)) s; report in $REPORT (report.md, scaling.png)"
