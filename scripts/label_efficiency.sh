#!/usr/bin/env bash
# Adapting the scene-agnostic model to a new city (docs/model.md, "Adapting to a new city"): fine-tune the
# zero-shot run (trained on other cities, this one held out) on the new city's train walks with
#   physics   no label at all (data.label_fraction 0: physics term only, calibration transferred from the init run)
#   labels1   1 % of the walks labelled, the rest physics only
#   labels5   5 %
#   labels100 every walk labelled (the in-scene reference)
# the same fixed epochs for every arm, best.pt = the last epoch (training.model_selection last: no labelled
# validation). Then compare with scripts/seed_comparison.py --arms (zero-shot = the init runs themselves).
#
#   INIT_0=runs/agnostic_many INIT_1=runs/agnostic_many_s1 INIT_2=runs/agnostic_many_s2 SEEDS="0 1 2" \
#       bash scripts/label_efficiency.sh
#
# INIT_<seed>: the zero-shot run fine-tuned for that seed (default INIT_0: then the seed is the fine-tune's
# seed alone: its labelled subset and batch order). A finished run is skipped, so the script resumes.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/labeleff}
DATASET=${DATASET:-datasets/munich}
EPOCHS=${EPOCHS:-6}
LR=${LR:-0.001}
SEEDS=${SEEDS:-0}
ARMS=${ARMS:-"physics:0 labels1:0.01 labels5:0.05 labels100:1"}
: "${INIT_0:?set INIT_0 to the zero-shot run (the city held out)}"
for seed in $SEEDS; do
  init_var="INIT_$seed"
  init=${!init_var:-$INIT_0}
  for arm in $ARMS; do
    name=${arm%%:*}
    fraction=${arm##*:}
    out="$OUT/${name}_s$seed"
    if [ -f "$out/status.json" ] && grep -q '"state": "done"' "$out/status.json"; then
      echo "$out: done, skipped"
      continue
    fi
    echo "$(date -u +%H:%M:%S) $out: label_fraction $fraction from $init"
    OMP_NUM_THREADS=1 nice -n 10 "$PY" -m core train --config configs/agnostic.yaml \
      --set "data.dataset=$DATASET" --set "training.init_from=$init" --set "data.label_fraction=$fraction" \
      --set "seed=$seed" --set "training.epochs=$EPOCHS" --set "training.learning_rate=$LR" \
      --set training.model_selection=last --set physics_loss.warmup_epochs=0 --set physics_loss.ramp_epochs=0 \
      --out "$out" --force --no-progress
  done
done
