#!/usr/bin/env bash
# The checks and measurements run on a lent GPU machine (the device tool; CI has no GPU).
#   bash scripts/gpu_check.sh check        the CUDA tests, `bench train` on CUDA and on the CPU
#   bash scripts/gpu_check.sh seeds        configs/model.yaml trained with seeds 0 1 2 on CUDA, then
#                                          scripts/seed_comparison.py (network, + MAP, the baselines)
#   bash scripts/gpu_check.sh many-scenes  `make many-scenes` with seeds 0 1 2 on CUDA
# Needs .whl/ (zarr, numcodecs, pydantic, ... for that machine's Python) when its image lacks them.
# Results go to $OUT (default /tmp/gpu_check); trained runs to $OUT/runs.tar.gz.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-check}" in
check)
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -3
  python3 -m core bench --device cuda --out "$OUT/bench_train_cuda.json" --no-progress train 2>&1 | tail -20
  python3 -m core bench --device cpu --out "$OUT/bench_train_cpu.json" --no-progress train --max-steps 60 2>&1 | tail -20
  ;;
seeds)
  for seed in 0 1 2; do
    timeout 200 python3 -m core train --config configs/model.yaml --set seed=$seed --out runs/gpu_seed$seed \
      --device cuda --no-progress --force 2>&1 | tail -1
  done
  timeout 240 python3 scripts/seed_comparison.py --runs runs/gpu_seed0 runs/gpu_seed1 runs/gpu_seed2 --split test \
    --device cuda 2>&1 | tee "$OUT/seeds_test.txt"
  for split in test val; do  # the run that ships as assets/default_run keeps its evaluations
    timeout 150 python3 -m core evaluate --run runs/gpu_seed0 --split $split --refine --baselines --device cuda \
      --no-progress 2>&1 | tail -14 | tee -a "$OUT/seed0_eval.txt"
  done
  tar czf "$OUT/runs.tar.gz" --exclude=last.pt runs/gpu_seed0 runs/gpu_seed1 runs/gpu_seed2
  ;;
many-scenes)
  for seed in 0 1 2; do
    python3 -m core train --config configs/model.yaml --set seed=$seed \
      --set 'data.datasets=[datasets/etoile, datasets/florence, datasets/simple_street_canyon, datasets/simple_street_canyon_with_cars]' \
      --set data.holdout_scene=munich --set training.epochs=20 --out runs/gpu_many$seed --device cuda --force \
      --no-progress 2>&1 | tail -1
    python3 -m core evaluate --run runs/gpu_many$seed --scene munich --refine --device cuda --no-progress \
      2>&1 | tee "$OUT/many_scenes_seed$seed.txt" | tail -10
  done
  tar czf "$OUT/many_runs.tar.gz" --exclude=last.pt --exclude=best.pt runs/gpu_many0 runs/gpu_many1 runs/gpu_many2
  ;;
esac
