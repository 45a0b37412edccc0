#!/usr/bin/env bash
# The foundation's GPU check, run once on the lent GPU machine (results: benchmarks/results/README.md):
#   run: bash benchmarks/gpu_foundation.sh    (writes under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  python3 benchmarks/train_step.py --preset gpu --steps 30 --warmup 5 --out "$OUT/results"
} 2>&1 | tee "$OUT/log.txt"
